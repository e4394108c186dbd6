"""Qwen2.5-0.5B: architecture facts (huggingface.co/Qwen/Qwen2.5-0.5B config.json); no weights ship
with peftjax. q/k/v biases, tied embeddings, 14 query / 2 key-value heads; 494,032,768 params."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Qwen2.5-0.5B",
        checkpoint="",
        hf_config=dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768,
                       max_window_layers=24, tie_word_embeddings=True, attention_dropout=0.0,
                       initializer_range=0.02, bos_token_id=151643, eos_token_id=151643),
    ))

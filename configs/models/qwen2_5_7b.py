"""Qwen2.5-7B: architecture facts (huggingface.co/Qwen/Qwen2.5-7B config.json); no weights ship with
peftjax. q/k/v biases, untied LM head, 28 query / 4 key-value heads; 7,615,616,512 params."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Qwen2.5-7B",
        checkpoint="",
        hf_config=dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, use_sliding_window=False, sliding_window=131072,
                       max_window_layers=28, tie_word_embeddings=False, attention_dropout=0.0,
                       initializer_range=0.02, bos_token_id=151643, eos_token_id=151643),
    ))

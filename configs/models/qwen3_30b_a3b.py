"""Qwen3-30B-A3B: architecture facts (huggingface.co/Qwen/Qwen3-30B-A3B config.json); no weights ship
with peftjax. A mixture of experts: 48 layers, every FFN sparse with 128 SwiGLU experts of width
768, 8 routed per token (top-k probabilities renormalised), q/k norms, 32 query / 4 key-value
heads of 128; 30.5 B params, 3.3 B active per token."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Qwen3-30B-A3B",
        checkpoint="",
        hf_config=dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                       num_key_value_heads=4, head_dim=128, hidden_act="silu",
                       max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       rope_scaling=None, attention_bias=False, use_sliding_window=False,
                       sliding_window=None, max_window_layers=48, num_experts=128,
                       num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                       mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=0.001,
                       tie_word_embeddings=False, attention_dropout=0.0, initializer_range=0.02,
                       bos_token_id=151643, eos_token_id=151645),
    ))

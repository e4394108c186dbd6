"""Gemma-2-9B: architecture facts (huggingface.co/google/gemma-2-9b config.json); no weights ship
with peftjax. Head dim 256, 16 query / 8 key-value heads, local (4096) / global layers
alternating, soft-caps 50 (attention) and 30 (logits), tied embeddings; 9,241,705,984 params."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Gemma-2-9B",
        checkpoint="",
        hf_config=dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=256, hidden_activation="gelu_pytorch_tanh",
                       max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, attention_bias=False, attention_dropout=0.0,
                       initializer_range=0.02, tie_word_embeddings=True, pad_token_id=0,
                       bos_token_id=2, eos_token_id=1),
    ))

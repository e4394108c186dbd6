"""Gemma-3-1B: architecture facts (huggingface.co/google/gemma-3-1b-pt config.json, a text-only
Gemma3ForCausalLM); no weights ship with peftjax. Head dim 256, 4 query heads / 1 key-value head,
five local (window 512, RoPE base 10⁴) per global (RoPE base 10⁶) layer, q/k norms, no soft-caps,
tied embeddings; 999,885,952 params."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Gemma-3-1B",
        checkpoint="",
        hf_config=dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                       intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       rope_local_base_freq=10000.0, rope_scaling=None, query_pre_attn_scalar=256,
                       sliding_window=512, sliding_window_pattern=6, attn_logit_softcapping=None,
                       final_logit_softcapping=None, attention_bias=False, attention_dropout=0.0,
                       initializer_range=0.02, tie_word_embeddings=True, pad_token_id=0,
                       bos_token_id=2, eos_token_id=1),
    ))

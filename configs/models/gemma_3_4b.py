"""Gemma-3-4B (text part): architecture facts (the ``text_config`` of huggingface.co/google/
gemma-3-4b-pt config.json, the rest Gemma3TextConfig's defaults); no weights ship with peftjax, and
only the text decoder is built (no vision tower). Head dim 256, 8 query / 4 key-value heads, five
local (window 1024, RoPE base 10⁴) per global layer (RoPE base 10⁶, linear interpolation x8), q/k
norms, tied embeddings; 3,880,263,168 params."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Gemma-3-4B",
        checkpoint="",
        hf_config=dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560,
                       intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       rope_local_base_freq=10000.0,
                       rope_scaling={"rope_type": "linear", "factor": 8.0},
                       query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
                       attn_logit_softcapping=None, final_logit_softcapping=None,
                       attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1),
    ))

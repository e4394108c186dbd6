"""T0_3B: architecture facts (transformers config.json fields of bigscience/T0_3B, i.e.
google/t5-xl-lm-adapt: T5 1.1 XL, gated-GELU, untied head); no weights ship."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="T0_3B",
        checkpoint="",
        hf_config=dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120,
                       num_layers=24, num_decoder_layers=24, num_heads=32,
                       relative_attention_num_buckets=32, dropout_rate=0.1,
                       layer_norm_epsilon=1e-6, initializer_factor=1.0,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                       tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                       decoder_start_token_id=0),
    ))

"""t5-xxl: architecture facts of T5 1.1 XXL (transformers config.json fields of
google/t5-v1_1-xxl and its LM-adapted twin google/t5-xxl-lm-adapt); no weights ship.

Why v1.1: "T5-XXL" in prompt-tuning work (Lester et al. 2021, Fig. 2: 5 tokens x d 4096 =
20,480 params) is the LM-adapted T5 1.1 XXL, d_model 4096, 64 heads of 64, d_ff 10240,
gated-GELU, untied head. The original v1.0 11B checkpoint (google-t5/t5-11b) has another shape
entirely (d_model 1024, 128 heads of 128, d_ff 65536) and would give 5 x 1024 = 5,120.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="t5-xxl",
        checkpoint="",
        hf_config=dict(model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                       num_layers=24, num_decoder_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, dropout_rate=0.1,
                       layer_norm_epsilon=1e-6, initializer_factor=1.0,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                       tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                       decoder_start_token_id=0),
    ))

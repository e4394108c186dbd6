"""t5-base: architecture facts (transformers config.json fields of google-t5/t5-base, T5 v1.0:
ReLU FFN, LM head tied to ``shared`` with the d_model**-0.5 output rescale); no weights ship."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="t5-base",
        checkpoint="",
        hf_config=dict(model_type="t5", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072,
                       num_layers=12, num_heads=12, relative_attention_num_buckets=32,
                       dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
                       feed_forward_proj="relu", is_encoder_decoder=True, n_positions=512,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    ))

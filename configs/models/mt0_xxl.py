"""mt0-xxl: architecture facts (transformers config.json fields of bigscience/mt0-xxl, an
mT5-xxl fine-tune: gated-GELU, untied head, 250,112-token vocabulary); no weights ship."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="mt0-xxl",
        checkpoint="",
        hf_config=dict(model_type="mt5", vocab_size=250112, d_model=4096, d_kv=64, d_ff=10240,
                       num_layers=24, num_decoder_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
                       feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                       is_encoder_decoder=True, tie_word_embeddings=False, pad_token_id=0,
                       eos_token_id=1, decoder_start_token_id=0),
    ))

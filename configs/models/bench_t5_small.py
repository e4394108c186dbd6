"""bench-t5-small: the encoder-decoder of the speed benchmarks (issue 22), t5-small's shape
(T5 v1.0: 6 + 6 layers, d_model 512, 8 heads of 64, ReLU FFN 2048, vocabulary 32,128, LM head
tied to ``shared``); 60,506,624 params. Random weights (none ship)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="bench-t5-small",
        checkpoint="",
        hf_config=dict(model_type="t5", vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                       num_layers=6, num_decoder_layers=6, num_heads=8, relative_attention_num_buckets=32,
                       dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
                       feed_forward_proj="relu", is_encoder_decoder=True, n_positions=512,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    ))

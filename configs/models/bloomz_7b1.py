"""bloomz-7b1: architecture facts (the transformers config.json fields of bigscience/bloomz-7b1);
no weights ship with peftjax. Tied LM head (``tie_word_embeddings`` defaults to True);
``pretraining_tp`` only records Megatron's tensor-parallel slicing (same product)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="bloomz-7b1",
        checkpoint="",
        hf_config=dict(model_type="bloom", vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32,
                       layer_norm_epsilon=1e-5, initializer_range=0.02,
                       apply_residual_connection_post_layernorm=False, hidden_dropout=0.0,
                       attention_dropout=0.0, pretraining_tp=4, slow_but_exact=False,
                       use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                       unk_token_id=0),
    ))

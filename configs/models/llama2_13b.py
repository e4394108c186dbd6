"""llama2-13b: architecture facts (transformers config.json fields); no weights ship with peftjax."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="llama2-13b",
        checkpoint="",
        hf_config=dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2),
    ))

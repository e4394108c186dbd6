"""Mistral-7B-v0.3: architecture facts (huggingface.co/mistralai/Mistral-7B-v0.3 config.json); no
weights ship with peftjax. 32 query / 8 key-value heads, no sliding window (null since v0.2),
32,768-token vocabulary; 7,248,023,552 params."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="Mistral-7B-v0.3",
        checkpoint="",
        hf_config=dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
                       rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
                       attention_dropout=0.0, initializer_range=0.02, bos_token_id=1,
                       eos_token_id=2),
    ))

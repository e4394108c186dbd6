"""bench-llama-small: the small Llama-architecture decoder of the speed benchmarks (issue 22):
8 layers, hidden 512, 8 query / 4 key-value heads (grouped-query attention), SwiGLU FFN 1536,
vocabulary 32,000, untied LM head; 57,942,528 params. Random weights (none ship), so every figure of
experiments/speed is one command, e.g.

    python scripts/bench_vs_peft.py --model=bench-llama-small --batch=8 --seq=128 --methods=lora
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="bench-llama-small",
        checkpoint="",
        hf_config=dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1536,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                       hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                       rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                       mlp_bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       initializer_range=0.02),
    ))

"""Prefix tuning (Li & Liang 2021): 20 key/value prefixes per layer, trained through the MLP.

    python scripts/count_params.py --config=configs/train.py:model=roberta-base,method=prefix_tuning
    # trainable_params 368640 = 2 * 12 * 20 * 768 (folded); count_rule gives the count with the MLP
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="prefix_tuning",
        num_virtual_tokens=20,     # p (PEFT's default)
        prefix_projection=True,    # reparameterisation MLP while training (Li & Liang §4.3)
        encoder_hidden_size=0,     # MLP width m; 0 = kv_heads * head_dim (PEFT's default)
    ))


def train_defaults() -> dict:
    # HF PEFT's prefix-tuning examples train with AdamW at 1e-2 (Li & Liang use 5e-5 for
    # GPT-2 over several epochs; our short runs need the larger rate, as prompt tuning does).
    return dict(learning_rate=1e-2)

"""Prefix tuning (Li & Liang 2021): 20 key/value prefixes per layer, trained through the MLP.

    python scripts/count_params.py --config=configs/train.py:model=roberta-base,method=prefix_tuning
    # trainable_params 368640 = 2 * 12 * 20 * 768 (folded); count_rule gives the count with the MLP
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("prefix_tuning"))


def train_defaults() -> dict:
    # Through the MLP, 1e-3 (measured: all-MiniLM-L6-v2, tweet_sentiment, 100 steps of batch 32,
    # warmup 10%: 1e-2 never leaves the majority class, 1e-3 learns). Li & Liang train GPT-2's
    # reparameterised prefixes at 5e-5 for several epochs; HF PEFT's examples use 1e-2 for plain
    # prefixes (prefix_projection=False), which suit a larger rate.
    return dict(learning_rate=1e-3)

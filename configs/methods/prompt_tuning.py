"""Prompt tuning (Lester et al. 2021): 20 virtual tokens initialised from sampled vocabulary."""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("prompt_tuning"))


def train_defaults() -> dict:
    # Lester et al. use lr 0.3 with Adafactor; with AdamW prompt embeddings want ~1e-2.
    return dict(learning_rate=1e-2)

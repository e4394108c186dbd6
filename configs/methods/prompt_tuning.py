"""Prompt tuning (Lester et al. 2021): 20 virtual tokens initialised from sampled vocabulary."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="prompt_tuning",
        num_virtual_tokens=20,
        init="vocab",        # random | vocab | text
        init_text="",
    ))


def train_defaults() -> dict:
    # Lester et al. use lr 0.3 with Adafactor; with AdamW prompt embeddings want ~1e-2.
    return dict(learning_rate=1e-2)

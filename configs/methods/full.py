"""Full fine-tuning (baseline): every parameter trainable."""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("full"))


def train_defaults() -> dict:
    # BERT/RoBERTa fine-tuning rates are 1e-5..5e-5 (Devlin et al. 2019; Liu et al. 2019);
    # MiniLM's small width tolerates the top of that range.
    return dict(learning_rate=5e-5)

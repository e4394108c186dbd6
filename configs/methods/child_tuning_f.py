"""Child-tuning_F (Xu et al. 2021): full fine-tuning with a fresh Bernoulli(reserve_p) gradient
mask each step, rescaled by 1/reserve_p."""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("child_tuning_f"))


def train_defaults() -> dict:
    # The paper fine-tunes BERT-large/RoBERTa with full fine-tuning's rates (1e-5..4e-5).
    return dict(learning_rate=5e-5)

"""Child-tuning_D (Xu et al. 2021): a fixed child network, the top reserve_p of the encoder-layer
params by Fisher information from one pass over the training set; no rescaling."""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("child_tuning_d"))


def train_defaults() -> dict:
    # The paper uses full fine-tuning's rates for BERT-large/RoBERTa (1e-5..4e-5).
    return dict(learning_rate=5e-5)

"""BitFit (Ben Zaken et al. 2022): biases only. ``subset=query_intermediate`` is the paper's
half-size variant."""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("bitfit"))


def train_defaults() -> dict:
    return dict(learning_rate=1e-3)  # the paper sweeps 1e-4..1e-3 for BERT-base

"""BitFit (Ben Zaken et al. 2022): biases only. ``subset=query_intermediate`` is the paper's
half-size variant."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="bitfit", subset="all", biases=""))


def train_defaults() -> dict:
    return dict(learning_rate=1e-3)  # the paper sweeps 1e-4..1e-3 for BERT-base

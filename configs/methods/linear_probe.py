"""Linear probe: the task head alone on the frozen model (the head-only baseline)."""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("linear_probe"))


def train_defaults() -> dict:
    # A linear model on fixed features: a large rate (no backbone to destabilise).
    return dict(learning_rate=1e-2)

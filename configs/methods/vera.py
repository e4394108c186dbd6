"""VeRA (Kopiczko et al. 2024). Defaults: PEFT's ``VeraConfig`` (r 256, d_initial 0.1,
dropout 0) on the query/value projections.

The shared random A/B are drawn from the run's seed (``--config.method.projection_prng_key=0``
pins them, as PEFT's default does) and kept in the method state (checkpointed; PEFT's
``save_projection=True``). The learning rate default (1e-2) is an
assumption, not a paper setting: VeRA trains very few params and wants larger rates than LoRA.
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("vera"))


def train_defaults() -> dict:
    return dict(learning_rate=1e-2)

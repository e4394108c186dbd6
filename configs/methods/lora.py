"""LoRA (Hu et al. 2022). Defaults: PEFT's (r=8, alpha=8, query/value projections).

Paper settings: RoBERTa-base r=8 on query,value, alpha 8 (repo scripts 16), lr 5e-4;
rsLoRA: ``--config.method.use_rslora=True``; PiSSA: ``--config.method.init=pissa``.
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("lora"))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)  # LoRA Table 9, RoBERTa-base GLUE

"""DyLoRA (Valipour et al. 2023). Defaults: the paper's RoBERTa-base GLUE setting, r_max 8,
alpha 16, query/value projections, "frozen" mode (only the sampled b-th component is trained).

Evaluate at another rank: ``--config.method.eval_rank=4``; sweep ranks of a finished run:
``python scripts/dylora_sweep.py --workdir=runs/dylora --ranks=1,2,4,8``.
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("dylora"))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)

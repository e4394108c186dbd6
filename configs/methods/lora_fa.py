"""LoRA-FA (Zhang et al. 2023): LoRA with A frozen at its random init (method state), only B
trained. Defaults: PEFT's LoRA defaults (r=8, alpha=8, query/value projections); counts B only
(roberta-base r=8 q,v: 147,456). ``--config.method.gradient_projection=True`` adds PEFT's
LoraFAOptimizer projection of B's gradient, (AᵀA)⁻¹ g_B / s² (PEFT's optimizer also uses
``--config.train.eps=1e-6 --config.train.weight_decay=0``).
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("lora_fa"))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)  # as LoRA (the paper keeps LoRA's hyperparameters)

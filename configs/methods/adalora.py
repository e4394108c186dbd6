"""AdaLoRA (Zhang et al. 2023). Defaults: PEFT's ``AdaLoraConfig`` (init_r 12, target_r 8,
lora_alpha 8, tinit 0, tfinal 0, deltaT 1, beta1 = beta2 = 0.85, orth_reg_weight 0.5) on the
query/value projections.

``total_step`` (required by the method, > tinit + tfinal): the number of training steps the
budget schedule spans. 0 here means "this run's length": the loop fills it with
``train.steps × train.grad_accum_steps`` (the step counter AdaLoRA sees is the micro-step).
Set it explicitly to shrink the budget over a different horizon.

Official GLUE scripts (DeBERTaV3-base) target query,key,value,intermediate,layer.output,
attention.output, with orthogonality weight 0.1 and deltaT 10 or 100.
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("adalora"))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)

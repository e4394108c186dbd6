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


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="adalora",
        init_r=12,             # initial rank of every targeted layer (budget b0 = init_r · layers)
        target_r=8,            # average final rank (budget b_T = target_r · layers)
        alpha=8.0,             # output scale alpha / init_r (PEFT: lora_alpha / ranknum)
        dropout=0.0,
        targets=r"\.(query|value|q_proj|v_proj|c_attn|query_key_value|q|v)$",
        tinit=0,               # warm-up steps at the full budget
        tfinal=0,              # final steps at the target budget with the rank pattern fixed
        deltaT=1,              # masking interval during the budget phase
        beta1=0.85,            # importance EMA
        beta2=0.85,            # uncertainty EMA
        orth_reg_weight=0.5,   # weight of the orthogonality regulariser (official scripts: 0.1)
        total_step=0,          # 0: train.steps × train.grad_accum_steps (filled by the loop)
    ))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)

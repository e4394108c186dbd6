"""(IA)³ (Liu et al. 2022). Defaults: PEFT's ``IA3Config`` targets and feedforward modules for the
model type (RoBERTa/BERT: key, value, output.dense with output.dense feedforward; Llama:
k_proj, v_proj, down_proj with down_proj feedforward), vectors initialised to ones.

    python scripts/count_params.py --config=configs/train.py:model=roberta-base,method=ia3

gives 64,512 trainable params (PEFT's print_trainable_parameters on the same model: 64,512
plus the classifier it trains as modules_to_save).
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("ia3"))


def train_defaults() -> dict:
    return dict(learning_rate=3e-3)  # T-Few's (IA)³ rate (Liu et al. 2022, §3.3)

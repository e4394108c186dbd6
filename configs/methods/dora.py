"""DoRA (Liu et al. 2024). Defaults: PEFT's LoRA defaults with ``use_dora=True`` (r=8, alpha=8,
query/value projections, magnitude m initialised to ||W0||_c).

Paper commonsense setting (Table 1): LLaMA-7B, targets q,k,v,up,down, r 32, alpha 64, lr 1e-4
(2e-4 for r 16):

    python scripts/count_params.py --config=configs/train.py:model=llama-7b,method=dora \\
      --config.method.rank=32 --config.method.targets='q_proj|k_proj|v_proj|up_proj|down_proj'

gives 56,975,360 trainable params (LoRA in the same setting: 56,098,816).
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("dora"))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)  # as LoRA; DoRA's LLaMA runs use 1e-4 (r 32) / 2e-4 (r 16)

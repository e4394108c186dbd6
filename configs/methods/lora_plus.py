"""LoRA+ (Hayou et al. 2024): LoRA with B's learning rate ``lr_ratio`` (16, PEFT's
``loraplus_lr_ratio``) times A's, applied to the updates after AdamW. Defaults: PEFT's LoRA
defaults (r=8, alpha=8, query/value projections); the count is LoRA's (roberta-base r=8 q,v:
294,912). The adapter file and PEFT export are plain LoRA's.
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("lora_plus"))


def train_defaults() -> dict:
    # A's rate (B's is 16x): half LoRA's 5e-4, as PEFT's create_loraplus_optimizer advises
    # ("slightly smaller (e.g., by a factor of 2) than typical vanilla LoRA learning rates").
    return dict(learning_rate=2.5e-4)

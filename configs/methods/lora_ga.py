"""LoRA-GA (Wang et al. 2024): LoRA initialised from the SVD of the full gradient of each target
over the first ``num_examples`` training rows (``batch_size`` a backward pass; the reference
code's 64 batches of 2), the frozen kernel replaced by W0 − s·B₀A₀. Defaults: PEFT's LoRA
defaults (r=8, alpha=8, query/value projections) and ``LoraGAConfig`` (direction ArB2r, scale
stable, γ 16); ``form=paper`` gives the authors' scaling. The count is LoRA's (roberta-base r=8
q,v: 294,912). PEFT export writes the trained adapter as PEFT's rank-2r LoRA of the original base.
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("lora_ga"))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)  # as LoRA (an assumption, not a paper setting)

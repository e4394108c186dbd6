"""OLoRA (Büyükakyüz 2024): LoRA initialised from the QR decomposition of W0, the frozen kernel
replaced by its residual. Defaults: PEFT's LoRA defaults with ``init_lora_weights="olora"``
(r=8, alpha=8, query/value projections); the count is LoRA's (roberta-base r=8 q,v: 294,912).
PEFT export writes the trained adapter as PEFT's rank-2r LoRA of the original base.
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("olora"))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)  # as LoRA (the paper fine-tunes LLMs at LoRA's rates)

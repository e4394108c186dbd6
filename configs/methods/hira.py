"""HiRA (Huang et al., ICLR 2025): ΔW = W0 ⊙ (A B), a high-rank update at LoRA's parameter
count. Defaults: PEFT's ``HiraConfig`` (r 32, no dropout, no scaling) on the query/value
projections. RoBERTa-base at r 8 on query,value:

    python scripts/count_params.py --config=configs/train.py:model=roberta-base,method=hira \\
      --config.method.rank=8

gives 294,912 trainable params (as LoRA; PEFT's print_trainable_parameters adds the classifier).
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("hira"))


def train_defaults() -> dict:
    return dict(learning_rate=5e-4)  # as LoRA; not a paper setting (it tunes LLMs at 1e-4..2e-4)

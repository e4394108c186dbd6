"""LayerNorm tuning (Zhao et al. 2024): the scales and biases of the normalisation layers PEFT's
``LNTuningConfig`` targets for the model type (Llama: input_layernorm, post_attention_layernorm,
norm); BERT/RoBERTa, which PEFT has no default for: every LayerNorm (bert-base: 38,400 params).
"""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("ln_tuning"))


def train_defaults() -> dict:
    return dict(learning_rate=1e-3)  # as BitFit: a few thousand base params (assumption)

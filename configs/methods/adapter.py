"""Bottleneck adapters: Houlsby placement (two per layer, m=64) by default; ``placement=pfeiffer``
gives AdapterHub's SeqBnConfig: one per layer at the FFN, reading LN(h + x), ReLU, m = d/16 (set
bottleneck=0), init N(0, 0.02²). ``train_layernorm=True`` is the Houlsby paper's setting (the
LayerNorms train with the adapters); off by default (peftjax/methods/adapter.py)."""

import ml_collections

from peftjax.methods import default_config


def get_config() -> ml_collections.ConfigDict:
    # The defaults are the method's Config dataclass (peftjax/methods), the one source of truth.
    return ml_collections.ConfigDict(default_config("adapter"))


def train_defaults() -> dict:
    return dict(learning_rate=1e-3)  # Houlsby et al. sweep {3e-5..3e-3}

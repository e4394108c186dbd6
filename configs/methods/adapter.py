"""Bottleneck adapters: Houlsby placement (two per layer, m=64) by default; ``placement=pfeiffer``
gives one per layer after the FFN, ReLU, m = d/16 (set bottleneck=0)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="adapter",
        placement="houlsby",
        bottleneck=64,
        reduction_factor=16,
        activation="",        # '' = gelu for houlsby, relu for pfeiffer
        init_scale=1e-3,
        train_layernorm=False,
    ))


def train_defaults() -> dict:
    return dict(learning_rate=1e-3)  # Houlsby et al. sweep {3e-5..3e-3}

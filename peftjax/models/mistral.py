"""Decoder family: Mistral (``model_type="mistral"``) in Flax linen.

Mistral 7B (Jiang et al. 2023, "Mistral 7B", §2) is the Llama architecture (``llama.py``;
grouped-query attention with 8 key/value heads, no biases) with sliding-window attention
(SWA) in every layer: the query in slot ``i`` attends to the slots ``j`` with
``i - W < j <= i`` (``W = sliding_window``, itself included), as transformers'
``modeling_mistral`` builds its mask (``create_sliding_window_causal_mask`` when
``sliding_window`` is set, the plain causal mask when it is null). The window applies in
training (the full forward pass) and in incremental decoding: the KV cache keeps every slot and
the mask hides the ones that fell out of the window (``llama.attention_masks``), so cached and
recomputed logits agree token for token. Mistral-7B-v0.1 has ``W = 4096``; v0.2 and v0.3 set
``sliding_window: null`` (full attention over a 32k context).

What a fixed-size cache buys over this (memory bounded by ``W`` instead of the sequence, the
paper's rolling buffer, §2) is not implemented: the buffers hold ``max_len`` slots.

Param paths are transformers' (``model.layers.0.self_attn.q_proj``), so the modules are
Llama's; only the config differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peftjax.models import llama, registry


@dataclasses.dataclass(frozen=True)
class MistralConfig(llama.LlamaConfig):
    """Llama's architecture facts plus the window every layer uses (None: full attention)."""

    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf: Any) -> "MistralConfig":
        window = getattr(hf, "sliding_window", None)
        if window is not None and int(window) < 1:
            raise ValueError(f"sliding_window must be >= 1 or null, got {window}")
        # transformers' Mistral has no attention or MLP bias switch (all projections bias-free).
        return dataclasses.replace(super().from_hf(hf), attention_bias=False, mlp_bias=False,
                                   sliding_window=None if window is None else int(window))

    def attention_window(self, layer: int) -> int | None:
        return self.sliding_window


FAMILY = registry.register_family(registry.Family(
    name="mistral",
    options=("scan_layers",),
    model_types=("mistral",),
    config_from_hf=MistralConfig.from_hf,
    build=llama.make_build(),
    heads=llama.HEADS,
    head_prefixes=llama.head_prefixes,
    backbone_prefix=llama.backbone_prefix,
    input_names=("input_ids", "attention_mask"),
))

"""Decoder family: Qwen3 dense models (``model_type="qwen3"``) in Flax linen.

Qwen3 (Yang et al. 2025, "Qwen3 technical report", §2) is Qwen2's architecture (``qwen2.py``,
itself Llama's) with two changes, as transformers' ``modeling_qwen3`` implements them and the
parity tests check to 1e-4 against PyTorch:

* no q/k/v bias: every attention projection has a bias iff ``attention_bias`` (False in every
  released config), as in Llama;
* QK-norm (Dehghani et al. 2023, "Scaling vision transformers to 22B parameters", §3.1.1; Qwen3
  report §2): each query and key head is RMS-normalised over its ``head_dim`` entries with a
  learned ``head_dim`` scale shared by all heads of the layer, after the projection and before
  RoPE::

      q_h = RoPE(RMSNorm_q(x W_q)_h),   k_h = RoPE(RMSNorm_k(x W_k)_h)

  (``self_attn.q_norm`` / ``self_attn.k_norm``; same eps as the block norms). It bounds the
  attention logits, which is why the qkv bias could go.

The per-layer sliding-window pattern (``use_sliding_window`` / ``max_window_layers`` /
``layer_types``) is Qwen2's (off in every released config). Tied embeddings (Qwen3-0.6B) as in
Llama.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from peftjax.models import llama, qwen2, registry
from peftjax.models.layers import RMSNorm


@dataclasses.dataclass(frozen=True)
class Qwen3Config(llama.LlamaConfig):
    """Llama's architecture facts (``attention_bias`` on all four projections, as Qwen3's
    config means it) plus Qwen2's per-layer attention pattern."""

    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, hf: Any) -> "Qwen3Config":
        window, types = qwen2.layer_pattern(hf)
        return dataclasses.replace(super().from_hf(hf), mlp_bias=False, sliding_window=window,
                                   layer_types=types)

    attention_window = qwen2.Qwen2Config.attention_window


class Qwen3Attention(llama.LlamaAttention):
    """Llama's attention with per-head RMSNorm of queries and keys before RoPE."""

    def project_qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = super().project_qkv(h)
        eps = self.config.rms_norm_eps
        q = RMSNorm(eps, self.dtype, name="q_norm")(q)   # over the last axis: head_dim
        k = RMSNorm(eps, self.dtype, name="k_norm")(k)
        return q, k, v


class Qwen3DecoderLayer(llama.LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3LayerStack(llama.LlamaLayerStack):
    layer_cls = Qwen3DecoderLayer


class Qwen3Model(llama.LlamaModel):
    stack_cls = Qwen3LayerStack


class Qwen3ForCausalLM(llama.LlamaForCausalLM):
    model_cls = Qwen3Model


class Qwen3ForSequenceClassification(llama.LlamaForSequenceClassification):
    model_cls = Qwen3Model


FAMILY = registry.register_family(registry.Family(
    name="qwen3",
    options=("scan_layers",),
    model_types=("qwen3",),
    config_from_hf=Qwen3Config.from_hf,
    build=llama.make_build(Qwen3Model, Qwen3ForCausalLM, Qwen3ForSequenceClassification),
    heads=llama.HEADS,
    head_prefixes=llama.head_prefixes,
    backbone_prefix=llama.backbone_prefix,
    input_names=("input_ids", "attention_mask"),
))

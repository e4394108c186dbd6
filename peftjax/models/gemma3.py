"""Decoder family: Gemma 3 text models (``model_type="gemma3_text"``) in Flax linen.

Gemma 3 (Gemma Team 2025, "Gemma 3 technical report", §2) is Gemma 2 (``gemma2.py``: (1 + w)
RMSNorm, sandwich norms, √hidden-scaled embeddings, GeGLU, ``query_pre_attn_scalar``) with, as
transformers' ``modeling_gemma3`` implements them and the parity tests check to 1e-4:

* QK-norm instead of soft-capping: each query and key head is normalised by a Gemma RMSNorm
  over ``head_dim`` (``self_attn.q_norm`` / ``k_norm``) after the projection, before RoPE; the
  soft-caps are off in the released configs (still honoured when set);
* five local layers per global one (``layer_types``: layer ``i`` is global iff ``(i + 1) % 6 ==
  0``; window 512 on Gemma-3-1B, 1024 on 4B), applied in training and in the KV cache;
* two RoPE bases (§2, "Long context"): the global layers rotate with ``rope_parameters
  ["full_attention"]`` (base 10⁶, and on 4B linear position interpolation by 8), the local ones
  with ``rope_parameters["sliding_attention"]`` (base 10⁴, transformers 4's
  ``rope_local_base_freq``); ``rope_for_layer`` gives each layer its RoPE config.

Only the text decoder (``Gemma3ForCausalLM``); the multimodal ``gemma3`` checkpoints nest it
under ``language_model`` and are not served here.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax

from peftjax.models import gemma2, llama, qwen2, registry


def _rope(params: Any) -> tuple[float, str, tuple]:
    return llama.rope_from_hf(types.SimpleNamespace(rope_parameters=dict(params or {})))


@dataclasses.dataclass(frozen=True)
class Gemma3Config(gemma2.Gemma2Config):
    """Gemma 2's facts (the global RoPE in the Llama rope fields) plus the local layers' RoPE."""

    local_rope_theta: float = 10000.0
    local_rope_type: str = "default"
    local_rope_scaling: tuple = ()

    @classmethod
    def from_hf(cls, hf: Any) -> "Gemma3Config":
        params = getattr(hf, "rope_parameters", None) or {}
        if isinstance(params, dict) and "full_attention" in params:
            full, local = params.get("full_attention"), params.get("sliding_attention")
        else:  # a transformers-4 style object: rope_theta, rope_scaling, rope_local_base_freq
            full = {"rope_theta": getattr(hf, "rope_theta", 1_000_000.0),
                    **(getattr(hf, "rope_scaling", None) or {})}
            local = {"rope_theta": getattr(hf, "rope_local_base_freq", 10_000.0)}
        # Gemma 2's from_hf reads the global RoPE through the Llama fields.
        view = types.SimpleNamespace(**{**vars(hf), "rope_parameters": dict(full or {}),
                                        "rope_scaling": None, "rope_theta": None})
        base = super().from_hf(view)
        theta, kind, scaling = _rope(local)
        return cls(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                      "local_rope_theta": theta, "local_rope_type": kind,
                      "local_rope_scaling": scaling})

    def rope_for_layer(self, layer: int) -> llama.LlamaConfig:
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return dataclasses.replace(self, rope_theta=self.local_rope_theta,
                                       rope_type=self.local_rope_type,
                                       rope_scaling=self.local_rope_scaling)
        return self

    attention_window = qwen2.Qwen2Config.attention_window


class Gemma3Attention(gemma2.Gemma2Attention):
    """Gemma 2's attention with per-head (1 + w) RMSNorm of queries and keys before RoPE."""

    def project_qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = super().project_qkv(h)
        eps = self.config.rms_norm_eps
        q = gemma2.GemmaRMSNorm(eps, self.dtype, name="q_norm")(q)   # over head_dim
        k = gemma2.GemmaRMSNorm(eps, self.dtype, name="k_norm")(k)
        return q, k, v


class Gemma3DecoderLayer(gemma2.Gemma2DecoderLayer):
    attention_cls = Gemma3Attention


class Gemma3LayerStack(llama.LlamaLayerStack):
    layer_cls = Gemma3DecoderLayer


class Gemma3Model(gemma2.Gemma2Model):
    stack_cls = Gemma3LayerStack


class Gemma3ForCausalLM(gemma2.Gemma2ForCausalLM):
    model_cls = Gemma3Model


class Gemma3ForSequenceClassification(llama.LlamaForSequenceClassification):
    model_cls = Gemma3Model


FAMILY = registry.register_family(registry.Family(
    name="gemma3",
    options=("scan_layers",),
    model_types=("gemma3_text",),
    config_from_hf=Gemma3Config.from_hf,
    build=llama.make_build(Gemma3Model, Gemma3ForCausalLM, Gemma3ForSequenceClassification),
    heads=llama.HEADS,
    head_prefixes=llama.head_prefixes,
    backbone_prefix=llama.backbone_prefix,
    input_names=("input_ids", "attention_mask"),
))

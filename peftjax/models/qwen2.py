"""Decoder family: Qwen2 and Qwen2.5 (``model_type="qwen2"``) in Flax linen.

Qwen2 (Yang et al. 2024, "Qwen2 technical report", §2.2.1; Qwen2.5 keeps the architecture,
"Qwen2.5 technical report" §2) is the Llama architecture (``llama.py``: pre-norm RMSNorm blocks,
SwiGLU, RoPE, grouped-query attention) with three differences, as transformers'
``modeling_qwen2`` implements them and the parity tests check to 1e-4 against PyTorch:

* the query, key and value projections have a bias (``q = x W_q + b_q``, likewise k, v); the
  output projection ``o_proj`` and the MLP have none (the config has no ``attention_bias``
  switch: the biases are part of the architecture);
* the small models tie the LM head to the input embeddings (``tie_word_embeddings``, e.g.
  Qwen2.5-0.5B: ``logits = h E^T``), which the Llama modules already support;
* optional sliding-window attention on the upper layers: with ``use_sliding_window`` the
  layers ``i >= max_window_layers`` attend to the last ``sliding_window`` slots only
  (transformers' ``layer_types``: ``"sliding_attention"`` / ``"full_attention"`` per layer).
  Every released Qwen2/Qwen2.5 config has ``use_sliding_window: false``.

Param paths are transformers' (``model.layers.0.self_attn.q_proj.bias``), so checkpoints load by
name through ``hf_io`` and PEFT's qwen2 target names carry over.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from peftjax.models import llama, registry
from peftjax.models.layers import Dense, normal_init

LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_pattern(hf: Any) -> tuple[int | None, tuple[str, ...]]:
    """``(sliding_window, layer_types)`` of a transformers config with ``layer_types``.

    transformers (v5) resolves ``use_sliding_window`` / ``max_window_layers`` into
    ``layer_types`` and sets ``sliding_window`` to None when sliding is off; a config object
    without ``layer_types`` (an older transformers) gets them computed the same way.
    """
    window = getattr(hf, "sliding_window", None)
    if getattr(hf, "use_sliding_window", True) is False:
        window = None
    layers = int(getattr(hf, "num_hidden_layers"))
    types = getattr(hf, "layer_types", None)
    if types is None:
        first = int(getattr(hf, "max_window_layers", layers))
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(layers)]
    types = tuple(str(t) for t in types)
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"unsupported layer_types {unknown}; supported: {', '.join(LAYER_TYPES)}")
    if len(types) != layers:
        raise ValueError(f"layer_types has {len(types)} entries for {layers} layers")
    if "sliding_attention" in types and not window:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    return (int(window) if window is not None else None), types


@dataclasses.dataclass(frozen=True)
class Qwen2Config(llama.LlamaConfig):
    """Llama's architecture facts plus the per-layer attention pattern.

    ``attention_bias`` stays False (it is ``o_proj``'s bias in the Llama modules); the q/k/v
    biases are unconditional in ``Qwen2Attention``.
    """

    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, hf: Any) -> "Qwen2Config":
        window, types = layer_pattern(hf)
        base = super().from_hf(hf)
        return dataclasses.replace(base, attention_bias=False, mlp_bias=False,
                                   sliding_window=window, layer_types=types)

    def attention_window(self, layer: int) -> int | None:
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None


class Qwen2Attention(llama.LlamaAttention):
    """Llama's attention with biased q/k/v projections (``o_proj`` without bias)."""

    def project_qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.config
        b, l, _ = h.shape
        heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def proj(features: int, name: str) -> Dense:
            return Dense(features, use_bias=True, dtype=self.dtype,
                         kernel_init=normal_init(c.initializer_range), name=name)

        q = proj(heads * d, "q_proj")(h).reshape(b, l, heads, d)
        k = proj(kv_heads * d, "k_proj")(h).reshape(b, l, kv_heads, d)
        v = proj(kv_heads * d, "v_proj")(h).reshape(b, l, kv_heads, d)
        return q, k, v


class Qwen2DecoderLayer(llama.LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2LayerStack(llama.LlamaLayerStack):
    layer_cls = Qwen2DecoderLayer


class Qwen2Model(llama.LlamaModel):
    stack_cls = Qwen2LayerStack


class Qwen2ForCausalLM(llama.LlamaForCausalLM):
    model_cls = Qwen2Model


class Qwen2ForSequenceClassification(llama.LlamaForSequenceClassification):
    model_cls = Qwen2Model


FAMILY = registry.register_family(registry.Family(
    name="qwen2",
    options=("scan_layers",),
    model_types=("qwen2",),
    config_from_hf=Qwen2Config.from_hf,
    build=llama.make_build(Qwen2Model, Qwen2ForCausalLM, Qwen2ForSequenceClassification),
    heads=llama.HEADS,
    head_prefixes=llama.head_prefixes,
    backbone_prefix=llama.backbone_prefix,
    input_names=("input_ids", "attention_mask"),
))

"""Decoder family: Gemma 2 (``model_type="gemma2"``) in Flax linen.

Gemma 2 (Gemma Team 2024, "Gemma 2: Improving open language models at a practical size", §2,
Table 1) keeps Llama's skeleton (``llama.py``: RoPE, grouped-query attention, gated MLP) and
changes, as transformers' ``modeling_gemma2`` implements them and the parity tests check to 1e-4
against PyTorch:

* RMSNorm with a zero-centred weight: ``y = x / rms(x) · (1 + w)`` computed in fp32 and cast back
  (``GemmaRMSNorm``; the checkpoint stores ``w``, initialised at 0);
* pre- and post-block norms ("sandwich" norm, §2): ``h = h + N_post(Attn(N_pre(h)))``, likewise for
  the MLP (``input_layernorm`` / ``post_attention_layernorm`` around attention,
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP);
* input embeddings scaled by ``√hidden`` (rounded to the compute dtype), the LM head always tied;
* GeGLU MLP (Shazeer 2020) with the tanh approximation of GELU (``gelu_pytorch_tanh``);
* attention scores scaled by ``query_pre_attn_scalar^-1/2`` (not ``head_dim^-1/2``) and
  soft-capped, ``s ← c · tanh(s / c)`` with ``c = attn_logit_softcapping`` (50), before the mask;
  the final logits likewise with ``final_logit_softcapping`` (30);
* alternating local / global layers: ``layer_types`` (even layers sliding, window 4096, odd
  layers full), the window applied in training and in the KV cache (``llama.attention_masks``).

The adapters' ``block_output`` hook gets each block's output after its post-norm (``norm=None``:
the residual add is the block's last step, as in the other pre-norm families).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models import hooks, llama, qwen2, registry
from peftjax.models.generation import KVCache
from peftjax.models.layers import attention_weights_and_output


class GemmaRMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · (1 + w)`` in fp32, cast to the input dtype (param ``scale`` = w)."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Gemma2Config(llama.LlamaConfig):
    """Llama's architecture facts plus Gemma 2's scales, soft-caps and layer pattern."""

    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, hf: Any) -> "Gemma2Config":
        if getattr(hf, "use_bidirectional_attention", None):
            raise ValueError("use_bidirectional_attention (Gemma encoders) is not supported")
        window, types = qwen2.layer_pattern(hf)
        soft = lambda name: None if getattr(hf, name, None) is None else float(getattr(hf, name))
        base = super().from_hf(hf)
        return dataclasses.replace(
            base, hidden_act=str(getattr(hf, "hidden_activation", None) or "gelu_pytorch_tanh"),
            mlp_bias=False,
            query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
            attn_logit_softcapping=soft("attn_logit_softcapping"),
            final_logit_softcapping=soft("final_logit_softcapping"),
            sliding_window=window, layer_types=types)

    attention_window = qwen2.Qwen2Config.attention_window


class Gemma2Attention(llama.LlamaAttention):
    """Llama's attention with Gemma's score scale and attention-logit soft-capping."""

    def attend(self, q, k, v, mask, dropout):
        c = self.config
        return attention_weights_and_output(q, k, v, mask, dropout, scale=c.query_pre_attn_scalar ** -0.5,
                                            softcap=c.attn_logit_softcapping)


class Gemma2DecoderLayer(llama.LlamaDecoderLayer):
    """``h += N_post(Attn(N_pre(h))); h += N_post'(MLP(N_pre'(h)))`` (sandwich norms)."""

    attention_cls = Gemma2Attention

    @nn.compact
    def __call__(self, h, mask, cos, sin, layer_cache, cache_index, train: bool):
        c = self.config
        norm = lambda name: GemmaRMSNorm(c.rms_norm_eps, self.dtype, name=name)
        block_output = hooks.active().block_output
        attn = self.attention_cls(c, self.dtype, name="self_attn")
        a, new_cache = attn(norm("input_layernorm")(h), mask, cos, sin, layer_cache, cache_index, train)
        h = block_output(attn, "attention", norm("post_attention_layernorm")(a), h, None)
        mlp = self.mlp_cls(c, self.dtype, name="mlp")
        m = mlp(norm("pre_feedforward_layernorm")(h))
        h = block_output(mlp, "ffn", norm("post_feedforward_layernorm")(m), h, None)
        return h, new_cache


class Gemma2LayerStack(llama.LlamaLayerStack):
    layer_cls = Gemma2DecoderLayer


class Gemma2Model(llama.LlamaModel):
    stack_cls = Gemma2LayerStack
    norm_cls = GemmaRMSNorm

    def embed(self, input_ids: jax.Array) -> jax.Array:
        h = self.embed_tokens(input_ids)
        # transformers multiplies by √hidden cast to the embedding's dtype (bf16 rounds it).
        return h * jnp.asarray(self.config.hidden_size ** 0.5, h.dtype)


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    return logits if cap is None else cap * jnp.tanh(logits / cap)


class Gemma2ForCausalLM(llama.LlamaForCausalLM):
    """Tied LM head, logits soft-capped by ``final_logit_softcapping``."""

    model_cls = Gemma2Model

    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None,
                 cache: KVCache | None = None):
        out = super().__call__(input_ids, attention_mask, train, positions, cache)
        cap = self.config.final_logit_softcapping
        return softcap(out, cap) if cache is None else (softcap(out[0], cap), out[1])


class Gemma2ForSequenceClassification(llama.LlamaForSequenceClassification):
    model_cls = Gemma2Model


FAMILY = registry.register_family(registry.Family(
    name="gemma2",
    options=("scan_layers",),
    model_types=("gemma2",),
    config_from_hf=Gemma2Config.from_hf,
    build=llama.make_build(Gemma2Model, Gemma2ForCausalLM, Gemma2ForSequenceClassification),
    heads=llama.HEADS,
    head_prefixes=llama.head_prefixes,
    backbone_prefix=llama.backbone_prefix,
    input_names=("input_ids", "attention_mask"),
))

"""Decoder family: Llama 1/2/3 (and Llama-architecture models) in Flax linen.

Module names are Hugging Face's (``model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.gate_proj``,
``model.norm``, ``lm_head``), so checkpoints load by name through ``hf_io`` and PEFT target
patterns (``q_proj|v_proj``) carry over. The forward pass follows transformers'
``modeling_llama`` (Touvron et al. 2023, "LLaMA"; "Llama 2"; Grattafiori et al. 2024, "The Llama 3
herd of models"), which the parity tests check to 1e-4 against PyTorch:

* pre-norm residual blocks:  ``h = h + Attn(RMSNorm(h));  h = h + MLP(RMSNorm(h))``, final RMSNorm
  (Zhang & Sennrich 2019, ``x / sqrt(mean(x^2) + eps) * w``).
* SwiGLU MLP (Shazeer 2020, "GLU variants improve Transformer"):
  ``down(act(gate(x)) * up(x))`` with ``act = silu``.
* rotary position embeddings (Su et al. 2021, "RoFormer"): for a head vector ``x`` at position
  ``p``, ``rope(x) = x * cos(p θ) + rotate_half(x) * sin(p θ)`` with ``θ_i = base^(-2i/d)``
  duplicated over the two halves (the "rotate_half" layout of transformers, not the interleaved
  one of the original paper), plus the context-extension variants transformers implements
  (``modeling_rope_utils``): linear position interpolation (Chen et al. 2023), dynamic NTK
  (bloc97/emozilla 2023), Llama-3.1 frequency-dependent scaling, and YaRN (Peng et al. 2023).
* grouped-query attention (Ainslie et al. 2023): ``num_key_value_heads`` key/value heads shared
  by ``num_attention_heads / num_key_value_heads`` query heads each; causal mask AND padding mask;
  scores and softmax in fp32 (``layers.attention_weights_and_output``).

Positions: when none are given they are ``cumsum(attention_mask) - 1`` (clipped at 0), i.e. the
count of real tokens before each token. For right padding (training) this equals the
``arange`` transformers uses; for left padding (batched generation) it is what transformers'
``generate`` computes, so a left-padded row gives the same logits as the row unpadded.

Hook points (``peftjax.models.hooks``): every Dense calls ``linear``; the model calls
``embeddings`` right after the token lookup (a prompt method may prepend virtual tokens; the LM
head drops those positions again so logits keep the input's length); each attention layer calls
``attention_kv`` after RoPE and after the KV-cache update (a prefix method may prepend keys and
values); each decoder layer calls ``block_output`` for its attention block (``o_proj``'s output)
and its MLP (``down_proj``'s output) with the layer input it adds them to and ``norm=None``
(pre-norm: the sum is the block's output); the hook's module is ``self_attn`` / ``mlp``.

Llama-architecture families (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3: ``qwen2.py`` ...) reuse
these modules through a few extension points, and each is one file: the config's
``attention_window(layer)`` (sliding-window layers; ``attention_masks`` builds one mask per
window) and ``rope_for_layer(layer)`` (Gemma 3's two RoPE bases; one cos/sin per RoPE config);
``LlamaAttention.project_qkv`` (biases, per-head norms) and ``attend`` (scale, logit
soft-capping); ``LlamaModel.embed`` (scaled embeddings); and the module classes the containers
name as class attributes (``attention_cls``, ``mlp_cls``, ``layer_cls``, ``stack_cls``,
``norm_cls``, ``model_cls``; ``make_build`` turns them into the registry's ``build``).

Incremental decoding: pass a ``generation.KVCache`` (preallocated ``(B, max_len, kv_heads,
head_dim)`` buffers per layer, written with ``lax.dynamic_update_slice`` so every decode step has
static shapes) and the call returns ``(output, new_cache)``; see ``peftjax.models.generation``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models import hooks, layer_scan, registry
from peftjax.models.generation import KVCache
from peftjax.models.layers import (Dense, Dropout, Embed, RMSNorm, activation, attention_weights_and_output,
                                   last_token_score, normal_init, remat_block)

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def rope_from_hf(hf: Any) -> tuple[float, str, tuple[tuple[str, Any], ...]]:
    """``(rope_theta, rope_type, other rope parameters)`` from a transformers v5 or v4 config.

    transformers 5 keeps every RoPE setting in ``config.rope_parameters`` (``{"rope_type",
    "rope_theta", "factor", ...}``); transformers 4 had ``config.rope_theta`` and an optional
    ``config.rope_scaling`` dict whose type key was ``"type"`` (old) or ``"rope_type"``.
    """
    params = getattr(hf, "rope_parameters", None)
    if not isinstance(params, Mapping) or not params:
        params = getattr(hf, "rope_scaling", None) or {}
    params = {k: v for k, v in dict(params).items() if v is not None}
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = getattr(hf, "rope_theta", None)
    theta = 10000.0 if theta is None else float(theta)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported by the llama family: {params}")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not part of the Llama architecture")
    params.pop("partial_rotary_factor", None)
    return theta, rope_type, _hashable(params)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture facts of a Llama-family model (from a transformers config).

    Frozen and hashable (rope parameters are a sorted tuple of pairs, eos ids a tuple) so that the
    config can be a static argument of jitted functions.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)

    @classmethod
    def from_hf(cls, hf: Any) -> "LlamaConfig":
        """From a transformers ``LlamaConfig`` (v5 ``rope_parameters`` or v4 ``rope_theta`` +
        ``rope_scaling``), or any object with those attributes."""
        def get(name: str, default: Any = None) -> Any:
            value = getattr(hf, name, None)
            return default if value is None else value

        heads = int(get("num_attention_heads", cls.num_attention_heads))
        hidden = int(get("hidden_size", cls.hidden_size))
        theta, rope_type, rope_scaling = rope_from_hf(hf)
        eos = get("eos_token_id", ())
        eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad = getattr(hf, "pad_token_id", None)
        bos = getattr(hf, "bos_token_id", None)
        return cls(
            vocab_size=int(get("vocab_size", cls.vocab_size)),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size", cls.intermediate_size)),
            num_hidden_layers=int(get("num_hidden_layers", cls.num_hidden_layers)),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)),
            hidden_act=str(get("hidden_act", cls.hidden_act)),
            max_position_embeddings=int(get("max_position_embeddings", cls.max_position_embeddings)),
            rms_norm_eps=float(get("rms_norm_eps", cls.rms_norm_eps)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            attention_dropout=float(get("attention_dropout", 0.0)),
            initializer_range=float(get("initializer_range", cls.initializer_range)),
            pad_token_id=None if pad is None else int(pad),
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=eos,
        )

    def rope_param(self, key: str, default: Any = None) -> Any:
        return dict(self.rope_scaling).get(key, default)

    def rope_for_layer(self, layer: int) -> "LlamaConfig":
        """The config whose RoPE fields (``rope_theta``, ``rope_type``, ``rope_scaling``) rotate
        ``layer``'s queries and keys: this one (Gemma 3's local layers have their own base)."""
        return self

    def attention_window(self, layer: int) -> int | None:
        """How many slots (itself included) a query of ``layer`` sees: ``None`` = every earlier
        one (Llama's full causal attention). Families with sliding-window layers (Mistral,
        Qwen2 ``layer_types``) override this; the model builds one mask per distinct window."""
        return None


# --------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: LlamaConfig, seq_len: jax.Array | int | None = None) -> tuple[Any, float]:
    """Inverse frequencies ``θ_i`` (``head_dim / 2`` values, fp32) and the cos/sin scale.

    Computed in fp32 exactly as transformers' ``modeling_rope_utils`` does, so logits match:

    * default (Su et al. 2021): ``θ_i = 1 / base^(2i/d)``.
    * linear (Chen et al. 2023, position interpolation): ``θ_i / factor``.
    * dynamic NTK: ``base' = base * (factor * L / L_max - (factor - 1))^(d / (d - 2))`` with
      ``L = max(seq_len, L_max)``; ``seq_len`` is the largest position + 1 of the call (traced).
    * llama3: wavelengths ``λ = 2π/θ`` above ``L_orig / low_freq_factor`` are divided by
      ``factor``, below ``L_orig / high_freq_factor`` kept, in between smoothly interpolated.
    * yarn (Peng et al. 2023): a linear ramp between interpolated (``θ/factor``) and extrapolated
      (``θ``) frequencies over the correction range given by ``beta_fast``/``beta_slow``; cos and
      sin are scaled by ``attention_factor`` (default ``0.1 ln(factor) + 1``).
    """
    dim = config.head_dim
    base = config.rope_theta
    kind = config.rope_type
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)

    def default(b: float) -> np.ndarray:
        return (np.float32(1.0) / (np.float32(b) ** exponents)).astype(np.float32)

    if kind == "default":
        return default(base), 1.0
    factor = config.rope_param("factor")
    if kind == "linear":
        return (default(base) / np.float32(factor)).astype(np.float32), 1.0
    if kind == "dynamic":
        max_pos = config.max_position_embeddings
        if seq_len is None:
            return default(base), 1.0
        length = jnp.maximum(jnp.asarray(seq_len), max_pos).astype(jnp.float32)
        new_base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (new_base ** jnp.asarray(exponents)), 1.0
    if kind == "llama3":
        inv_freq = default(base)
        low, high = config.rope_param("low_freq_factor"), config.rope_param("high_freq_factor")
        old_len = config.rope_param("original_max_position_embeddings", config.max_position_embeddings)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
        smooth = ((np.float32(old_len) / wavelen - np.float32(low))
                  / np.float32(high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        old_len = config.rope_param("original_max_position_embeddings", config.max_position_embeddings)
        if factor is None:
            factor = config.max_position_embeddings / old_len
        attention_factor = config.rope_param("attention_factor")
        mscale, mscale_all_dim = config.rope_param("mscale"), config.rope_param("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                                if mscale and mscale_all_dim else get_mscale(factor))
        beta_fast = config.rope_param("beta_fast") or 32
        beta_slow = config.rope_param("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if config.rope_param("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)
        extrapolation_factor = (1 - ramp).astype(np.float32)
        pos_freqs = (np.float32(base) ** exponents).astype(np.float32)
        extrapolated = np.float32(1.0) / pos_freqs
        interpolated = np.float32(1.0) / (np.float32(factor) * pos_freqs)
        inv_freq = interpolated * (1 - extrapolation_factor) + extrapolated * extrapolation_factor
        return inv_freq.astype(np.float32), float(attention_factor)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_cos_sin(config: LlamaConfig, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``cos(p θ)`` and ``sin(p θ)`` of shape ``(B, L, head_dim)`` (θ duplicated over the halves),
    computed in fp32 and cast to the compute dtype, as transformers' ``LlamaRotaryEmbedding``."""
    seq_len = jnp.max(positions) + 1 if config.rope_type == "dynamic" else None
    inv_freq, scale = rope_inv_freq(config, seq_len)
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` for ``x`` of shape ``(B, L, heads, head_dim)``."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


def attention_masks(config: LlamaConfig, q_slots: jax.Array, kv_slots: jax.Array,
                    kv_valid: jax.Array) -> dict[int | None, jax.Array]:
    """``(B, 1, Q, K)`` bool masks, one per attention window the layers use (``None``: full).

    Slot ``j`` is visible to the query in slot ``i`` iff it holds a real token, ``j <= i``
    (causal) and, for a window ``W``, ``j > i - W`` (transformers' ``sliding_window_overlay``:
    the query and the ``W - 1`` slots before it; Beltagy et al. 2020, "Longformer", and Jiang et
    al. 2023, "Mistral 7B", §2). Slots, not RoPE positions, as in transformers: in a left- or
    right-padded row the real tokens are contiguous, so the two agree on real tokens. With a KV
    cache the query slots start at ``cache.index`` and the keys span the whole buffer, so cached
    decoding applies the same window as a full forward pass.
    """
    b = kv_valid.shape[0]
    base = (kv_slots[None, :] <= q_slots[:, None])[None, None] & kv_valid[:, None, None, :]
    shape = (b, 1, q_slots.shape[0], kv_slots.shape[0])
    windows = {config.attention_window(i) for i in range(config.num_hidden_layers)}
    masks = {}
    for window in windows:
        mask = base if window is None else base & (kv_slots[None, :] > q_slots[:, None] - window)[None, None]
        masks[window] = jnp.broadcast_to(mask, shape)
    return masks


# ------------------------------------------------------------------------------------- modules


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional preallocated KV cache."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, cos, sin, layer_cache, cache_index, train: bool):
        c = self.config
        init = normal_init(c.initializer_range)
        b, l, _ = h.shape

        q, k, v = self.project_qkv(h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            k_buf, v_buf = layer_cache
            start = (jnp.int32(0), cache_index, jnp.int32(0), jnp.int32(0))
            k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), start)
            v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), start)
            new_cache = (k_buf, v_buf)
            k, v = k_buf.astype(self.dtype), v_buf.astype(self.dtype)
        k, v, mask = hooks.active().attention_kv(self, k, v, mask)
        dropout = None
        if train and c.attention_dropout > 0:
            drop = Dropout(c.attention_dropout)
            dropout = lambda p: drop(p, deterministic=False)
        out = self.attend(q, k, v, mask, dropout)
        out = Dense(c.hidden_size, use_bias=c.attention_bias, dtype=self.dtype, kernel_init=init,
                    name="o_proj")(out.reshape(b, l, c.num_attention_heads * c.head_dim))
        return out, new_cache

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dropout) -> jax.Array:
        """``softmax(q kᵀ / √d + mask) v``; Gemma overrides the scale and soft-caps the logits."""
        return attention_weights_and_output(q, k, v, mask, dropout, scale=self.config.head_dim ** -0.5)

    def project_qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries ``(B, L, heads, d)``, keys and values ``(B, L, kv_heads, d)`` before RoPE.

        The extension point of Llama-architecture families: Qwen2 gives q/k/v a bias, Qwen3
        normalises each query and key head (it is called inside the compact ``__call__``, so
        the layers it creates are the attention module's own: ``self_attn.q_proj``).
        """
        c = self.config
        b, l, _ = h.shape

        def proj(features: int, name: str) -> Dense:
            return Dense(features, use_bias=c.attention_bias, dtype=self.dtype,
                         kernel_init=normal_init(c.initializer_range), name=name)

        heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = proj(heads * d, "q_proj")(h).reshape(b, l, heads, d)
        k = proj(kv_heads * d, "k_proj")(h).reshape(b, l, kv_heads, d)
        v = proj(kv_heads * d, "v_proj")(h).reshape(b, l, kv_heads, d)
        return q, k, v


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        init = normal_init(c.initializer_range)
        dense = lambda f, name: Dense(f, use_bias=c.mlp_bias, dtype=self.dtype, kernel_init=init, name=name)
        h = activation(c.hidden_act)(dense(c.intermediate_size, "gate_proj")(x)) * \
            dense(c.intermediate_size, "up_proj")(x)
        return dense(c.hidden_size, "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h))``."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    # Module classes as class attributes (not dataclass fields): a Llama-architecture family
    # subclasses the one module that differs and names it here.
    attention_cls = LlamaAttention
    mlp_cls = LlamaMLP

    @nn.compact
    def __call__(self, h, mask, cos, sin, layer_cache, cache_index, train: bool):
        c = self.config
        block_output = hooks.active().block_output
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(h)
        attn = self.attention_cls(c, self.dtype, name="self_attn")
        a, new_cache = attn(x, mask, cos, sin, layer_cache, cache_index, train)
        h = block_output(attn, "attention", a, h, None)
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(h)
        mlp = self.mlp_cls(c, self.dtype, name="mlp")
        h = block_output(mlp, "ffn", mlp(x), h, None)
        return h, new_cache


class LlamaLayerStack(nn.Module):
    """Holds layers named "0", "1", ... so paths read ``model.layers.3``."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    remat: bool | str = False  # a layers.REMAT_POLICIES name, or True/False
    scan: bool = False  # one lax.scan over the layers (layer_scan.py) outside KV-cache decoding
    layer_cls = LlamaDecoderLayer
    # Why a stack may refuse the scan (None: it can). Layers that differ in structure (MoE
    # next to dense layers) or sow values cannot share one scanned body. A class attribute
    # like layer_cls (not a dataclass field).
    scan_refusal = None

    @nn.compact
    def __call__(self, h, masks, ropes, caches, cache_index, train: bool):
        """``masks``: the attention mask per window (``config.attention_window``); ``ropes``:
        ``(cos, sin)`` per RoPE config (``config.rope_for_layer``)."""
        c = self.config
        if self.scan and self.scan_refusal:
            raise ValueError(f"scan_layers: {self.scan_refusal}")
        if layer_scan.scanning(self, caches):
            return self.scanned(h, masks, ropes, train), None
        layer_cls = remat_block(self.layer_cls, self.remat, static_argnums=(7,))
        new_caches = []
        for i in range(c.num_hidden_layers):
            layer_cache = None if caches is None else caches[i]
            cos, sin = ropes[c.rope_for_layer(i)]
            h, new_cache = layer_cls(c, self.dtype, name=str(i))(
                h, masks[c.attention_window(i)], cos, sin, layer_cache, cache_index, train)
            new_caches.append(new_cache)
        return h, (None if caches is None else new_caches)

    def scanned(self, h, masks, ropes, train: bool):
        """The layers as one ``lax.scan`` (``layer_scan.scan_stack``); layer ``i``'s window mask
        and RoPE tables are picked from the distinct ones by index (Gemma's alternating layers)."""
        c = self.config
        n = c.num_hidden_layers
        windows = [c.attention_window(i) for i in range(n)]
        rope_cfgs = [c.rope_for_layer(i) for i in range(n)]
        mask_keys, rope_keys = list(dict.fromkeys(windows)), list(dict.fromkeys(rope_cfgs))
        mask_stack = jnp.stack([masks[w] for w in mask_keys])
        cos_stack = jnp.stack([ropes[r][0] for r in rope_keys])
        sin_stack = jnp.stack([ropes[r][1] for r in rope_keys])
        mask_idx = jnp.asarray([mask_keys.index(w) for w in windows], jnp.int32)
        rope_idx = jnp.asarray([rope_keys.index(r) for r in rope_cfgs], jnp.int32)

        def per_layer(i):
            r = rope_idx[i]
            return mask_stack[mask_idx[i]], cos_stack[r], sin_stack[r], None, None, train

        return layer_scan.scan_stack(self, lambda: self.layer_cls(c, self.dtype, parent=None), h,
                                     per_layer, n, self.remat, train)


class LlamaModel(nn.Module):
    """The bare decoder: returns ``(hidden states, effective attention mask, new cache or None)``.

    Hidden states and mask cover the sequence as the layers saw it: if a prompt method prepended
    ``n`` virtual tokens through the ``embeddings`` hook they come first (``L_in + n`` positions).

    With ``cache`` (a ``generation.KVCache``), the input tokens are written into the cache at
    ``cache.index`` and attend to everything cached before them. A cache that has not been
    ``prefilled`` yet takes the virtual tokens of a prompt method too (its buffers grow by ``n``);
    on later (decode) calls the hook's prepended positions are dropped, since the cache already
    holds them.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False
    stack_cls = LlamaLayerStack
    norm_cls = RMSNorm

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype,
                                  embedding_init=normal_init(c.initializer_range))
        self.layers = self.stack_cls(c, self.dtype, self.remat, self.scan)
        self.norm = self.norm_cls(c.rms_norm_eps, self.dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """The token embeddings the layers start from (Gemma scales them by √hidden)."""
        return self.embed_tokens(input_ids)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied LM head: ``h @ embed_tokens.T``."""
        return self.embed_tokens.attend(h)

    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None,
                 cache: KVCache | None = None):
        input_ids = jnp.asarray(input_ids)
        attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        b, l_in = input_ids.shape
        h = self.embed(input_ids)
        h, attention_mask, _ = hooks.active().embeddings(self, h, attention_mask, None)
        n_pre = h.shape[1] - l_in
        if n_pre < 0:
            raise ValueError("the embeddings hook shortened the sequence; only prepending is supported")
        if n_pre and cache is not None and cache.prefilled:
            # Decode step: the prompt method's virtual tokens are already in the cache.
            h, attention_mask, n_pre = h[:, n_pre:], attention_mask[:, n_pre:], 0
        l = h.shape[1]
        valid = attention_mask.astype(bool)
        if positions is None:
            start = 0 if cache is None else cache.next_position[:, None]
            positions = jnp.maximum(start + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        elif n_pre:
            positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_pre, dtype=jnp.int32), (b, n_pre)),
                                         positions.astype(jnp.int32) + n_pre], axis=1)
        positions = positions.astype(jnp.int32)

        if cache is None:
            q_slots = kv_slots = jnp.arange(l, dtype=jnp.int32)
            kv_valid = valid
            caches, index = None, None
        else:
            if n_pre and not cache.prefilled:
                cache = cache.grow(n_pre)
            if l > cache.max_len:
                raise ValueError(f"{l} tokens do not fit a KV cache of max_len {cache.max_len}")
            index = cache.index.astype(jnp.int32)
            kv_valid = jax.lax.dynamic_update_slice(cache.mask, valid, (jnp.int32(0), index))
            q_slots = index + jnp.arange(l, dtype=jnp.int32)
            kv_slots = jnp.arange(cache.max_len, dtype=jnp.int32)
            caches = list(zip(cache.keys, cache.values))
        masks = attention_masks(self.config, q_slots, kv_slots, kv_valid)

        ropes = {}
        for i in range(self.config.num_hidden_layers):
            rope = self.config.rope_for_layer(i)
            if rope not in ropes:
                ropes[rope] = rope_cos_sin(rope, positions, self.dtype)
        h, new_caches = self.layers(h, masks, ropes, caches, index, train)
        h = self.norm(h)
        new_cache = None
        if cache is not None:
            next_position = jnp.maximum(
                cache.next_position, jnp.max(jnp.where(valid, positions + 1, 0), axis=1).astype(jnp.int32))
            new_cache = cache.replace(keys=tuple(k for k, _ in new_caches),
                                      values=tuple(v for _, v in new_caches), mask=kv_valid,
                                      index=index + l, next_position=next_position, prefilled=True)
        return h, attention_mask, new_cache


class LlamaForCausalLM(nn.Module):
    """Causal LM: logits ``(B, L_in, vocab)`` in fp32; ``(logits, new_cache)`` when given a cache.

    ``lm_head`` is absent when ``tie_word_embeddings`` (logits ``= h @ embed_tokens.T``).
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False
    model_cls = LlamaModel

    def setup(self) -> None:
        c = self.config
        self.model = self.model_cls(c, self.dtype, self.remat, self.scan)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                                 kernel_init=normal_init(c.initializer_range))

    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None,
                 cache: KVCache | None = None):
        h, _, new_cache = self.model(input_ids, attention_mask, train, positions, cache)
        n_pre = h.shape[1] - input_ids.shape[1]
        if n_pre:  # a prompt method's virtual tokens predict nothing the caller asked for
            h = h[:, n_pre:]
        logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)



class LlamaForSequenceClassification(nn.Module):
    """``score`` (no bias) on the hidden state of the last real token (num_labels == 1: regression).

    transformers pools at the rightmost token that differs from ``pad_token_id``; we use the
    rightmost position of ``attention_mask``, which is the same token whenever padding is masked
    and also works when ``pad_token_id`` equals the eos id.
    """

    config: LlamaConfig
    num_labels: int
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False
    model_cls = LlamaModel

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        h, _, _ = self.model_cls(self.config, self.dtype, self.remat, self.scan, name="model")(
            input_ids, attention_mask, train, positions)
        return last_token_score(h, input_ids, attention_mask, self.num_labels, self.dtype,
                                self.config.initializer_range)


def make_build(model_cls: type[nn.Module] = LlamaModel,
               causal_lm_cls: type[nn.Module] = LlamaForCausalLM,
               classifier_cls: type[nn.Module] = LlamaForSequenceClassification):
    """The registry's ``build`` for a Llama-architecture family's three module classes."""
    def build(config: LlamaConfig, head: str, num_labels: int, dtype, remat: bool,
              scan_layers: bool = False) -> nn.Module:
        if head == "none":
            return model_cls(config, dtype, remat, scan_layers)
        if head == "causal_lm":
            return causal_lm_cls(config, dtype, remat, scan_layers)
        return classifier_cls(config, num_labels, dtype, remat, scan_layers)

    return build


def head_prefixes(config: LlamaConfig, head: str) -> tuple[str, ...]:
    # The LM head is pretrained (part of the checkpoint), not a task head.
    return ("score",) if head in ("classification", "regression") else ()


def backbone_prefix(config: LlamaConfig, head: str) -> str:
    return "" if head == "none" else "model"


HEADS = ("none", "causal_lm", "classification", "regression")

FAMILY = registry.register_family(registry.Family(
    name="llama",
    options=("scan_layers",),
    model_types=("llama",),
    config_from_hf=LlamaConfig.from_hf,
    build=make_build(),
    heads=HEADS,
    head_prefixes=head_prefixes,
    backbone_prefix=backbone_prefix,
    input_names=("input_ids", "attention_mask"),
))

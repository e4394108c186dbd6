"""Encoder-decoder family: T5 v1.0, T5 v1.1 / LM-adapted (T0) and mT5 (mT0) in Flax linen.

Module names are Hugging Face's (``shared``, ``encoder.block.0.layer.0.SelfAttention.q``,
``decoder.block.0.layer.1.EncDecAttention.k``, ``encoder.block.0.layer.1.DenseReluDense.wi_0``,
``encoder.final_layer_norm``, ``lm_head``), so checkpoints load by name through ``hf_io`` and PEFT
target patterns (``q``, ``v``) carry over. The forward pass follows transformers' ``modeling_t5``
/ ``modeling_mt5`` (Raffel et al. 2020, "Exploring the limits of transfer learning with a unified
text-to-text transformer"; Xue et al. 2021, "mT5"), which the parity tests check to 1e-4:

* pre-norm residual sublayers, ``h = h + drop(Sublayer(LN(h)))``; encoder blocks hold
  ``layer.0`` self-attention and ``layer.1`` FFN, decoder blocks ``layer.0`` causal
  self-attention, ``layer.1`` cross-attention (``EncDecAttention``) and ``layer.2`` FFN; each
  stack ends in ``final_layer_norm``.
* T5's LayerNorm is an RMS norm without mean subtraction or bias,
  ``x / sqrt(mean(x^2) + eps) * w`` (statistics in fp32; ``layers.RMSNorm``).
* attention without the ``1/sqrt(d)`` scaling (Raffel et al. fold it into the init of ``q``):
  ``softmax(q k^T + b) v``, where ``b`` is the **relative position bias** — a learned scalar
  per head for each of ``relative_attention_num_buckets`` buckets of the offset
  ``key_pos - query_pos``: exact buckets for small offsets, logarithmic ones up to
  ``relative_attention_max_distance`` (Raffel et al. §2.1; Shaw et al. 2018). Bidirectional
  buckets (sign kept, half the buckets each way) in the encoder, unidirectional (past only) in
  the decoder. Only block 0 of each stack owns a table (``block.0.layer.0.SelfAttention
  .relative_attention_bias``); the bias it computes is shared by every later block of the
  stack. Cross-attention has no position bias.
* FFN ``DenseReluDense``: v1.0 ``wo(relu(wi(x)))``; v1.1 / mT5 gated-GELU (Shazeer 2020, "GLU
  variants improve Transformer") ``wo(gelu_new(wi_0(x)) * wi_1(x))``. No biases anywhere.
* output: v1.0 ties the LM head to ``shared`` and rescales the decoder output by
  ``d_model ** -0.5`` first; v1.1 and mT5 have an untied ``lm_head`` and no rescale.

Tied or not (``T5Config.tie_word_embeddings``): transformers 5 forces ``tie_word_embeddings=True``
on every T5/mT5 config object and keeps the v1.0/v1.1 distinction in
``scale_decoder_outputs`` (T5); it unties at load time when a checkpoint holds an
``lm_head.weight`` that differs from ``shared.weight``. So here: ``t5`` is tied iff
``scale_decoder_outputs`` (v1.0), ``mt5`` is always untied (every released mT5/mT0 checkpoint is),
and a checkpoint without ``lm_head.weight`` (one transformers saved from a tied model) loads its
``shared.weight`` into ``lm_head`` — the values transformers itself would run with.

Hook points (``peftjax.models.hooks``):

* ``linear``: every Dense (``q k v o`` of all attentions, ``wi``/``wi_0``/``wi_1``/``wo``, ``lm_head``).
* ``embeddings``: called once, by the **encoder** stack (site ``encoder``) on the input token
  embeddings: prompt tuning prepends its virtual tokens to the encoder input only (as HF PEFT's
  ``PROMPT_TUNING`` path for seq2seq does); the relative-position buckets then run over the
  extended sequence. The decoder's embeddings do not pass through it. (PEFT allocates
  ``2 n`` prompt rows for seq2seq models, ``num_transformer_submodules=2``, but that path uses
  only the first ``n``; we count the ``n`` that are used: 5 x 4096 = 20,480 on T5-XXL.)
* ``attention_kv``: in all three attentions — encoder and decoder self-attention (after the
  decoder's KV-cache update) and decoder cross-attention (on the keys/values of the encoder
  output). A method that prepends ``n`` keys gets a zero position bias for them.
* ``block_output``: kind ``"attention"`` for self-attention (encoder and decoder), ``"ffn"``
  for each FFN, and ``"cross_attention"`` for cross-attention — so Houlsby adapters (attention
  + FFN kinds) sit after self-attention and FFN, as AdapterHub's T5 default does (its cross
  adapters are off unless asked for). Each sublayer (``layer.i``) calls it with the sublayer's
  output after its dropout, the sublayer input it is added to and ``norm=None`` (pre-norm), as
  AdapterHub's T5 calls ``bottleneck_layer_forward(dropout(out), hidden_states, None)``; the
  hook's module is the ``SelfAttention`` / ``EncDecAttention`` / ``DenseReluDense`` inside it.

Training (teacher forcing): pass ``labels`` (``-100`` on positions not to learn); when no
``decoder_input_ids`` are given they are ``labels`` shifted right with ``decoder_start_token_id``
first and ``-100`` replaced by the pad id, exactly transformers' ``_shift_right``. The logits
align with ``labels`` (no further shift: ``losses.seq2seq_lm_loss``).

Generation (``generate``): the encoder runs once; the decoder then runs one token at a time on a
``Seq2SeqCache`` — preallocated self-attention key/value buffers written with
``dynamic_update_slice`` (static shapes, one compiled step) plus the cross-attention keys/values,
computed from the encoder output on the first decoder call only. Sampling reuses
``generation.sample_next`` (greedy, temperature, top-p).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from peftjax.models import hooks, layer_scan, registry
from peftjax.models.generation import _eos_ids, decode_loop
from peftjax.models.layers import (Dense, Dropout, Embed, RMSNorm, activation, attention_weights_and_output,
                                   remat_block)

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture facts of a T5-family model (from a transformers ``T5Config``/``MT5Config``).

    Frozen and hashable so it can be a static argument of jitted functions.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    tie_word_embeddings: bool = True     # no lm_head param: logits from ``shared``
    scale_decoder_outputs: bool = True   # decoder output * d_model**-0.5 before the head (v1.0)
    pad_token_id: int = 0
    eos_token_id: tuple[int, ...] = (1,)
    decoder_start_token_id: int = 0
    model_type: str = "t5"

    @property
    def vocab(self) -> int:
        return self.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @classmethod
    def from_hf(cls, hf: Any) -> "T5Config":
        """From a transformers ``T5Config`` / ``MT5Config`` (see the module docstring on ties)."""
        def get(name: str, default: Any) -> Any:
            value = getattr(hf, name, None)
            return default if value is None else value

        model_type = str(get("model_type", "t5"))
        ff = str(get("feed_forward_proj", "relu"))
        parts = ff.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj={ff!r} is invalid; expected 'ACT' or 'gated-ACT' "
                             "(e.g. 'relu', 'gated-gelu')")
        act = str(get("dense_act_fn", parts[-1]))
        if ff == "gated-gelu":
            act = "gelu_new"  # transformers' backwards-compatible meaning of gated-gelu
        activation(act)  # unsupported names fail here, listing the supported ones
        if model_type == "mt5":
            scale = False
        else:
            scale = bool(get("scale_decoder_outputs", get("tie_word_embeddings", True)))
        eos = get("eos_token_id", 1)
        eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad = int(get("pad_token_id", 0))
        num_layers = int(get("num_layers", cls.num_layers))
        return cls(
            vocab_size=int(get("vocab_size", cls.vocab_size)),
            d_model=int(get("d_model", cls.d_model)),
            d_kv=int(get("d_kv", cls.d_kv)),
            d_ff=int(get("d_ff", cls.d_ff)),
            num_layers=num_layers,
            num_decoder_layers=int(get("num_decoder_layers", num_layers)),
            num_heads=int(get("num_heads", cls.num_heads)),
            relative_attention_num_buckets=int(get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(get("relative_attention_max_distance", 128)),
            dropout_rate=float(get("dropout_rate", 0.1)),
            layer_norm_epsilon=float(get("layer_norm_epsilon", 1e-6)),
            initializer_factor=float(get("initializer_factor", 1.0)),
            dense_act_fn=act,
            is_gated_act=len(parts) == 2,
            tie_word_embeddings=scale,
            scale_decoder_outputs=scale,
            pad_token_id=pad,
            eos_token_id=eos,
            # T5 starts decoding from the pad token; transformers 5 configs may omit the field.
            decoder_start_token_id=int(get("decoder_start_token_id", pad)),
            model_type=model_type,
        )


# ----------------------------------------------------------------------- relative position bias


@functools.lru_cache(maxsize=64)
def bucket_table(max_offset: int, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every offset ``key_pos - query_pos`` in ``[-max_offset, max_offset]`` (index
    ``offset + max_offset``), as transformers' ``T5Attention._relative_position_bucket``.

    Offsets ``|n| < max_exact = buckets/2`` get their own bucket; larger ones share logarithmic
    buckets ``max_exact + log(n / max_exact) / log(max_distance / max_exact) * (buckets -
    max_exact)``, capped at the last bucket. Bidirectional: half the buckets for each sign.
    Computed once in numpy float32 (the dtype torch uses) and gathered by traced offsets, so the
    decoder's cached steps use exactly the training-time buckets.
    """
    rel = np.arange(-max_offset, max_offset + 1, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        scaled = (np.log(n.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, n, large)).astype(np.int32)


def relative_buckets(config: T5Config, query_pos: jax.Array, key_len: int, bidirectional: bool,
                     max_offset: int) -> jax.Array:
    """Buckets ``(Q, K)`` for query positions ``query_pos`` (traced ok) and keys ``0..key_len-1``."""
    table = jnp.asarray(bucket_table(max_offset, bidirectional, config.relative_attention_num_buckets,
                                     config.relative_attention_max_distance))
    offsets = jnp.arange(key_len, dtype=jnp.int32)[None, :] - query_pos.astype(jnp.int32)[:, None]
    return table[jnp.clip(offsets, -max_offset, max_offset) + max_offset]


# ------------------------------------------------------------------------------------- modules


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class T5Attention(nn.Module):
    """Multi-head attention without score scaling; ``q k v o`` Dense layers without bias.

    Self-attention: keys/values from ``h`` (decoder: written into the KV cache first).
    Cross-attention (``cross=True``): keys/values from the encoder output, or from the cache.
    Returns ``(output, position_bias, new_layer_cache)``; block 0's self-attention computes the
    position bias from ``buckets`` with its own table, later blocks receive it.
    """

    config: T5Config
    has_relative_attention_bias: bool = False
    cross: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, kv_input, mask, position_bias, buckets, layer_cache, cache_index, train: bool):
        c = self.config
        f = c.initializer_factor
        b, l, _ = h.shape
        heads, d = c.num_heads, c.d_kv
        inner = heads * d

        def proj(features: int, std: float, name: str) -> Dense:
            return Dense(features, use_bias=False, dtype=self.dtype, kernel_init=_normal(std), name=name)

        q = proj(inner, f * (c.d_model * d) ** -0.5, "q")(h).reshape(b, l, heads, d)
        new_cache = None
        if self.cross:
            if layer_cache is not None and layer_cache[0] is not None:
                k, v = layer_cache
                k, v = k.astype(self.dtype), v.astype(self.dtype)
            else:
                s = kv_input.shape[1]
                k = proj(inner, f * c.d_model ** -0.5, "k")(kv_input).reshape(b, s, heads, d)
                v = proj(inner, f * c.d_model ** -0.5, "v")(kv_input).reshape(b, s, heads, d)
            if layer_cache is not None:
                new_cache = (k, v)
        else:
            k = proj(inner, f * c.d_model ** -0.5, "k")(h).reshape(b, l, heads, d)
            v = proj(inner, f * c.d_model ** -0.5, "v")(h).reshape(b, l, heads, d)
            if layer_cache is not None:
                k_buf, v_buf = layer_cache
                start = (jnp.int32(0), cache_index, jnp.int32(0), jnp.int32(0))
                k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), start)
                v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), start)
                new_cache = (k_buf, v_buf)
                k, v = k_buf.astype(self.dtype), v_buf.astype(self.dtype)

        if self.has_relative_attention_bias:
            table = Embed(c.relative_attention_num_buckets, heads, self.dtype,
                          embedding_init=_normal(f * c.d_model ** -0.5), name="relative_attention_bias")
            position_bias = jnp.transpose(table(buckets), (2, 0, 1))[None]  # (1, H, Q, K)
        n_keys = k.shape[1]
        k, v, mask = hooks.active().attention_kv(self, k, v, mask)
        bias = position_bias
        if bias is not None and k.shape[1] != n_keys:  # a method prepended keys: no bias for them
            extra = k.shape[1] - n_keys
            bias = jnp.pad(bias, [(0, 0), (0, 0), (0, 0), (extra, 0)])
        dropout = None
        if train and c.dropout_rate > 0:
            drop = Dropout(c.dropout_rate)
            dropout = lambda p: drop(p, deterministic=False)
        out = attention_weights_and_output(q, k, v, mask, dropout, scale=1.0, bias=bias)
        out = proj(c.d_model, f * inner ** -0.5, "o")(out.reshape(b, l, inner))
        return out, position_bias, new_cache


class T5DenseReluDense(nn.Module):
    """``wo(act(wi(x)))`` (v1.0) or gated ``wo(act(wi_0(x)) * wi_1(x))`` (v1.1, mT5)."""

    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.config
        f = c.initializer_factor
        dense = lambda n, std, name: Dense(n, use_bias=False, dtype=self.dtype, kernel_init=_normal(std),
                                           name=name)
        act = activation(c.dense_act_fn)
        if c.is_gated_act:
            h = act(dense(c.d_ff, f * c.d_model ** -0.5, "wi_0")(x)) * dense(c.d_ff, f * c.d_model ** -0.5,
                                                                               "wi_1")(x)
        else:
            h = act(dense(c.d_ff, f * c.d_model ** -0.5, "wi")(x))
        h = Dropout(c.dropout_rate)(h, deterministic=not train)
        return dense(c.d_model, f * c.d_ff ** -0.5, "wo")(h)


class T5LayerAttention(nn.Module):
    """``h + drop(Attention(LN(h)))`` (self-attention or, with ``cross``, cross-attention)."""

    config: T5Config
    has_relative_attention_bias: bool = False
    cross: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, kv_input, mask, position_bias, buckets, layer_cache, cache_index, train: bool):
        c = self.config
        x = RMSNorm(c.layer_norm_epsilon, self.dtype, name="layer_norm")(h)
        name = "EncDecAttention" if self.cross else "SelfAttention"
        attn = T5Attention(c, self.has_relative_attention_bias, self.cross, self.dtype, name=name)
        a, position_bias, new_cache = attn(x, kv_input, mask, position_bias, buckets, layer_cache,
                                           cache_index, train)
        a = Dropout(c.dropout_rate)(a, deterministic=not train)
        kind = "cross_attention" if self.cross else "attention"
        return hooks.active().block_output(attn, kind, a, h, None), position_bias, new_cache


class T5LayerFF(nn.Module):
    """``h + drop(DenseReluDense(LN(h)))``."""

    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool):
        c = self.config
        x = RMSNorm(c.layer_norm_epsilon, self.dtype, name="layer_norm")(h)
        ffn = T5DenseReluDense(c, self.dtype, name="DenseReluDense")
        y = Dropout(c.dropout_rate)(ffn(x, train), deterministic=not train)
        return hooks.active().block_output(ffn, "ffn", y, h, None)


class T5LayerList(nn.Module):
    """A block's sublayers, named ``0, 1(, 2)`` so paths read ``encoder.block.3.layer.0``."""

    config: T5Config
    is_decoder: bool
    first: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, position_bias, buckets, enc_h, enc_mask, caches, cache_index, train: bool):
        c = self.config
        self_cache, cross_cache = (None, None) if caches is None else caches
        h, position_bias, new_self = T5LayerAttention(c, self.first, False, self.dtype, name="0")(
            h, None, mask, position_bias, buckets, self_cache, cache_index, train)
        new_cross = None
        if self.is_decoder:
            h, _, new_cross = T5LayerAttention(c, False, True, self.dtype, name="1")(
                h, enc_h, enc_mask, None, None, cross_cache, cache_index, train)
        h = T5LayerFF(c, self.dtype, name="2" if self.is_decoder else "1")(h, train)
        new_caches = None if caches is None else (new_self, new_cross)
        return h, position_bias, new_caches


class T5Block(nn.Module):
    config: T5Config
    is_decoder: bool
    first: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, position_bias, buckets, enc_h, enc_mask, caches, cache_index, train: bool):
        return T5LayerList(self.config, self.is_decoder, self.first, self.dtype, name="layer")(
            h, mask, position_bias, buckets, enc_h, enc_mask, caches, cache_index, train)


class T5BlockList(nn.Module):
    """Holds the blocks named ``0, 1, ...`` (``encoder.block.0``)."""

    config: T5Config
    is_decoder: bool
    dtype: Any = jnp.float32
    remat: bool | str = False  # a layers.REMAT_POLICIES name, or True/False
    scan: bool = False  # blocks 1 … N-1 as one lax.scan (layer_scan.py) outside KV-cache decoding

    @nn.compact
    def __call__(self, h, mask, buckets, enc_h, enc_mask, caches, cache_index, train: bool):
        c = self.config
        n = c.num_decoder_layers if self.is_decoder else c.num_layers
        block_cls = remat_block(T5Block, self.remat, static_argnums=(9,))
        if n > 2 and layer_scan.scanning(self, caches):
            # Block 0 alone holds the relative attention bias table and computes the position
            # bias every later block adds: it runs first, the identical blocks 1 … N-1 are scanned.
            h, position_bias, _ = block_cls(c, self.is_decoder, True, self.dtype, name="0")(
                h, mask, None, buckets, enc_h, enc_mask, None, cache_index, train)
            h = layer_scan.scan_stack(
                self, lambda: T5Block(c, self.is_decoder, False, self.dtype, parent=None), h,
                lambda i: (mask, position_bias, buckets, enc_h, enc_mask, None, cache_index, train),
                n, self.remat, train, start=1)
            return h, None
        position_bias = None
        new_caches = []
        for i in range(n):
            layer_caches = None if caches is None else caches[i]
            h, position_bias, new = block_cls(c, self.is_decoder, i == 0, self.dtype, name=str(i))(
                h, mask, position_bias, buckets, enc_h, enc_mask, layer_caches, cache_index, train)
            new_caches.append(new)
        return h, (None if caches is None else new_caches)


@struct.dataclass
class Seq2SeqCache:
    """Decoder state for incremental decoding (a pytree; ``prefilled`` is static).

    Attributes:
      keys, values: per decoder layer, self-attention buffers ``(B, max_len, heads, d_kv)``.
      cross_keys, cross_values: per decoder layer, ``(B, S, heads, d_kv)`` keys/values of the
        encoder output (``None`` until the first decoder call computes them).
      mask: ``(B, max_len)`` bool, True where a self-attention slot holds a real token.
      index: ``()`` int32, slots written so far (the position of the next decoder token).
      prefilled: False until the first decoder call.
    """

    keys: tuple
    values: tuple
    cross_keys: tuple | None
    cross_values: tuple | None
    mask: jax.Array
    index: jax.Array
    prefilled: bool = struct.field(pytree_node=False, default=False)

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def init_cache(config: T5Config, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> Seq2SeqCache:
    """An empty cache for ``max_len`` decoder tokens (the start token included)."""
    shape = (batch_size, max_len, config.num_heads, config.d_kv)
    n = config.num_decoder_layers
    return Seq2SeqCache(keys=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
                        values=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
                        cross_keys=None, cross_values=None,
                        mask=jnp.zeros((batch_size, max_len), bool), index=jnp.zeros((), jnp.int32))


class T5Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal + cross-attention) stack on given embeddings.

    Returns ``(hidden states, attention mask as the layers saw it, new cache or None)``.
    """

    config: T5Config
    is_decoder: bool
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False

    @nn.compact
    def __call__(self, embeds, attention_mask, enc_h=None, enc_mask=None, train: bool = False,
                 cache: Seq2SeqCache | None = None):
        c = self.config
        b, l_in = embeds.shape[:2]
        attention_mask = (jnp.ones((b, l_in), jnp.int32) if attention_mask is None
                          else jnp.asarray(attention_mask))
        if not self.is_decoder:
            embeds, attention_mask, _ = hooks.active().embeddings(self, embeds, attention_mask, None)
            if embeds.shape[1] < l_in:
                raise ValueError("the embeddings hook shortened the sequence; only prepending is supported")
        l = embeds.shape[1]
        valid = attention_mask.astype(bool)
        h = Dropout(c.dropout_rate)(embeds, deterministic=not train)
        caches, index, kv_valid = None, None, None
        if not self.is_decoder:
            mask = jnp.broadcast_to(valid[:, None, None, :], (b, 1, l, l))
            buckets = relative_buckets(c, jnp.arange(l), l, True, max(l - 1, 1))
        elif cache is None:
            causal = jnp.tril(jnp.ones((l, l), bool))
            mask = causal[None, None] & valid[:, None, None, :]
            buckets = relative_buckets(c, jnp.arange(l), l, False, max(l - 1, 1))
        else:
            if l > cache.max_len:
                raise ValueError(f"{l} decoder tokens do not fit a cache of max_len {cache.max_len}")
            index = cache.index.astype(jnp.int32)
            kv_valid = jax.lax.dynamic_update_slice(cache.mask, valid, (jnp.int32(0), index))
            q_slots = index + jnp.arange(l, dtype=jnp.int32)
            causal = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :] <= q_slots[:, None]
            mask = causal[None, None] & kv_valid[:, None, None, :]
            buckets = relative_buckets(c, q_slots, cache.max_len, False, cache.max_len - 1)
            cross = (cache.cross_keys, cache.cross_values)
            caches = [((cache.keys[i], cache.values[i]),
                       (None, None) if cross[0] is None else (cross[0][i], cross[1][i]))
                      for i in range(c.num_decoder_layers)]
        mask = jnp.broadcast_to(mask, (b, 1, l, mask.shape[-1]))
        cross_mask = None
        if self.is_decoder:
            cross_mask = jnp.broadcast_to(enc_mask.astype(bool)[:, None, None, :], (b, 1, l, enc_mask.shape[1]))
        h, new_caches = T5BlockList(c, self.is_decoder, self.dtype, self.remat, self.scan, name="block")(
            h, mask, buckets, enc_h, cross_mask, caches, index, train)
        h = RMSNorm(c.layer_norm_epsilon, self.dtype, name="final_layer_norm")(h)
        h = Dropout(c.dropout_rate)(h, deterministic=not train)
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(
                keys=tuple(s[0] for s, _ in new_caches), values=tuple(s[1] for s, _ in new_caches),
                cross_keys=tuple(x[0] for _, x in new_caches),
                cross_values=tuple(x[1] for _, x in new_caches),
                mask=kv_valid, index=index + l, prefilled=True)
        return h, attention_mask, new_cache


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """Teacher-forcing decoder inputs: ``[start, y_0, ..., y_{T-2}]`` with ``-100`` → pad
    (transformers' ``T5PreTrainedModel._shift_right``)."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    shifted = jnp.concatenate([jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, jnp.int32),
                               labels[..., :-1]], axis=-1)
    return jnp.where(shifted == IGNORE, pad_token_id, shifted)


class T5ForConditionalGeneration(nn.Module):
    """Encoder-decoder with an LM head (``lm=True``; logits ``(B, T, vocab)`` fp32) or the bare
    ``T5Model`` (``lm=False``; the decoder's last hidden states).

    ``__call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels)``:
    ``decoder_input_ids`` default to ``shift_right(labels)``; ``decoder_attention_mask`` defaults
    to all ones (causal masking only, as transformers). ``encode`` and ``decode`` are the two
    halves, used by ``generate``.
    """

    config: T5Config
    dtype: Any = jnp.float32
    remat: bool | str = False
    lm: bool = True
    scan: bool = False

    def setup(self) -> None:
        c = self.config
        self.shared = Embed(c.vocab_size, c.d_model, self.dtype,
                            embedding_init=_normal(c.initializer_factor * 1.0))
        self.encoder = T5Stack(c, False, self.dtype, self.remat, self.scan)
        self.decoder = T5Stack(c, True, self.dtype, self.remat, self.scan)
        if self.lm and not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                                 kernel_init=_normal(c.initializer_factor * 1.0))

    def encode(self, input_ids, attention_mask=None, train: bool = False):
        """``(encoder hidden states, encoder attention mask)``; both cover a prompt method's
        prepended virtual tokens."""
        input_ids = jnp.asarray(input_ids)
        h, mask, _ = self.encoder(self.shared(input_ids), attention_mask, train=train)
        return h, mask

    def decode(self, decoder_input_ids, encoder_hidden, encoder_mask, decoder_attention_mask=None,
               train: bool = False, cache: Seq2SeqCache | None = None):
        """Logits (or hidden states for ``lm=False``) of the decoder tokens; with a ``cache``,
        ``(output, new_cache)``."""
        c = self.config
        decoder_input_ids = jnp.asarray(decoder_input_ids)
        h, _, new_cache = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask,
                                       encoder_hidden, encoder_mask, train=train, cache=cache)
        if self.lm:
            if c.scale_decoder_outputs:
                h = h * (c.d_model ** -0.5)
            out = (self.shared.attend(h) if c.tie_word_embeddings else self.lm_head(h)).astype(jnp.float32)
        else:
            out = h
        return out if cache is None else (out, new_cache)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None, train: bool = False):
        c = self.config
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("the T5 model needs decoder_input_ids or labels (teacher forcing: "
                                 "decoder inputs are labels shifted right)")
            decoder_input_ids = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)
        enc_h, enc_mask = self.encode(input_ids, attention_mask, train)
        return self.decode(decoder_input_ids, enc_h, enc_mask, decoder_attention_mask, train)


# ------------------------------------------------------------------------------------ generation


def _module(model: Any):
    return getattr(model, "module", model)


def _generate_impl(module, max_new_tokens: int, temperature: float, top_p: float, eos: tuple[int, ...],
                   pad: int, start: int, use_cache: bool, params, input_ids, attention_mask, rng):
    b = input_ids.shape[0]
    variables = {"params": params}
    enc_h, enc_mask = module.apply(variables, input_ids, attention_mask, method="encode")
    total = 1 + max_new_tokens
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    first = jnp.full((b, 1), start, jnp.int32)

    if use_cache:
        cache = init_cache(module.config, b, total, module.dtype)
        logits, carry = module.apply(variables, first, enc_h, enc_mask, cache=cache, method="decode")
        logits = logits[:, 0]

        def forward(token, t, cache):
            out, cache = module.apply(variables, token[:, None], enc_h, enc_mask, cache=cache,
                                      method="decode")
            return out[:, 0], cache
    else:
        # Reference path: the whole decoder on a fixed-size buffer each step; causal masking keeps
        # the not-yet-written slots from influencing earlier positions.
        buf = jnp.concatenate([first, jnp.full((b, max_new_tokens), pad, jnp.int32)], axis=1)
        logits = module.apply(variables, buf, enc_h, enc_mask, method="decode")[:, 0]
        carry = buf

        def forward(token, t, buf):
            buf = jax.lax.dynamic_update_slice(buf, token[:, None], (jnp.int32(0), t + 1))
            out = module.apply(variables, buf, enc_h, enc_mask, method="decode")
            return jax.lax.dynamic_slice_in_dim(out, t + 1, 1, axis=1)[:, 0], buf

    out = decode_loop(logits, forward, carry, max_new_tokens=max_new_tokens, rng=rng,
                      temperature=temperature, top_p=top_p, pad=pad, eos_arr=eos_arr)
    return jnp.concatenate([first, out], axis=1)


_STATIC = (0, 1, 2, 3, 4, 5, 6, 7)
_generate_jit = jax.jit(_generate_impl, static_argnums=_STATIC)


def generate(model: Any, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             max_new_tokens: int = 32, *, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, decoder_start_token_id: int | None = None,
             use_cache: bool = True) -> jax.Array:
    """Encoder-decoder generation; returns the decoder sequences ``(B, 1 + max_new_tokens)`` int32,
    starting with ``decoder_start_token_id`` as transformers' ``generate`` does.

    Args:
      model: a ``registry.Model`` of the t5 family with the ``seq2seq_lm`` head (or its module).
      input_ids, attention_mask: ``(B, S)`` encoder input (any padding).
      temperature: 0 = greedy; otherwise sample from ``softmax(logits / temperature)``, top-p
        filtered (``generation.sample_next``); step ``t`` draws with ``fold_in(rng, t)``.
      eos_token_id: id(s) that end a row (``None``: the config's; ``()``: never). Rows that ended
        are filled with ``pad_token_id`` (default: the config's pad id); generation stops once
        every row has ended.
      use_cache: False recomputes the whole decoder each step (the reference for the cache).
    """
    module = _module(model)
    config = module.config
    if not isinstance(config, T5Config) or not module.lm:
        raise ValueError("t5.generate needs a t5-family model with the 'seq2seq_lm' head")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = (jnp.ones_like(input_ids) if attention_mask is None
                      else jnp.asarray(attention_mask, jnp.int32))
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng for determinism")
    eos = _eos_ids(eos_token_id, config)
    pad = config.pad_token_id if pad_token_id is None else int(pad_token_id)
    start = config.decoder_start_token_id if decoder_start_token_id is None else int(decoder_start_token_id)
    static = (module, int(max_new_tokens), float(temperature), float(top_p), eos, pad, start,
              bool(use_cache))
    if type(hooks.active()) is hooks.Hooks:  # no method active: compiled code can be reused
        fn = _generate_jit
    else:  # the trace depends on the active hooks, which jax's cache key cannot see
        def traced(*args):
            return _generate_impl(*args)

        fn = jax.jit(traced, static_argnums=_STATIC)
    return fn(*static, params, input_ids, attention_mask, rng)


# -------------------------------------------------------------------------------- registration


def _build(config: T5Config, head: str, num_labels: int, dtype, remat: bool,
           scan_layers: bool = False) -> nn.Module:
    return T5ForConditionalGeneration(config, dtype, remat, lm=head == "seq2seq_lm", scan=scan_layers)


FAMILY = registry.register_family(registry.Family(
    name="t5",
    options=("scan_layers",),
    model_types=("t5", "mt5"),
    config_from_hf=T5Config.from_hf,
    build=_build,
    heads=("none", "seq2seq_lm"),
    # The LM head is pretrained (part of the checkpoint), not a task head.
    head_prefixes=lambda config, head: (),
    # HF T5 checkpoints carry no backbone prefix (``shared``, ``encoder.*``, ``decoder.*``).
    backbone_prefix=lambda config, head: "",
    input_names=("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"),
    tied_fallbacks=(("lm_head.weight", "shared.weight"),),
))

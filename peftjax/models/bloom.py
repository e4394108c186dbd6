"""BLOOM (BigScience 2022, "BLOOM: A 176B-parameter open-access multilingual language model") in Flax.

Module names are Hugging Face's (``transformer.word_embeddings``,
``transformer.word_embeddings_layernorm``, ``transformer.h.0.self_attention.query_key_value``,
``transformer.h.0.mlp.dense_h_to_4h``, ``transformer.ln_f``), so checkpoints load by name
through ``hf_io`` and PEFT's BLOOM target (``query_key_value``) carries over. The forward pass
follows transformers' ``modeling_bloom``, which the parity tests check to 1e-4 against PyTorch:

* no position embeddings; a LayerNorm right after the word embeddings (BLOOM §3.2.4
  "Embedding LayerNorm").
* pre-LN blocks ``h = r + Attn(LN(h))`` then ``h = r' + MLP(LN(h))``, where the residual ``r`` is
  the block input (or, with ``apply_residual_connection_post_layernorm``, the LayerNorm output),
  final ``ln_f``; the LM head is tied to the word embeddings.
* fused ``query_key_value`` (hidden → 3·hidden) whose output is laid out per head,
  ``[heads, 3, head_dim]`` (q, k, v interleaved by head, Megatron's layout), not ``[3, heads, d]``.
* ALiBi (Press et al. 2022, "Train short, test long"): no positions; every head ``h`` adds
  ``m_h · j`` to the score of key ``j``, where ``j`` counts the real (unpadded) tokens before the
  key (``(cumsum(mask) - 1) · mask``, transformers' ``build_alibi_tensor``). Softmax is invariant
  to per-query shifts, so this equals the paper's ``-m_h (i - j)``. Slopes (paper §3 and its
  reference code): for ``n`` heads, with ``p = 2^floor(log2 n)``,
  ``m_h = (2^(-8/p))^h`` for ``h = 1..p``, and for the ``n - p`` remaining heads the odd powers
  ``(2^(-4/p))^(1, 3, 5, ...)`` of the next power of two's sequence.
* scores ``QKᵀ/sqrt(d) + alibi``, fp32 softmax; MLP ``dense_4h_to_h(gelu(dense_h_to_4h(x)))``
  with 4·hidden units and BLOOM's tanh GELU ``x/2 (1 + tanh(0.79788456 x (1 + 0.044715 x²)))``.
* ``hidden_dropout`` on the attention and MLP outputs before the residual add.

Hook points: every Linear calls ``linear``; ``embeddings`` right after the token lookup and
before the embedding LayerNorm (where PEFT's ``inputs_embeds`` enter); ``attention_kv`` after
the KV-cache update; each block calls ``block_output`` for its attention and MLP outputs (after
the dense projection and dropout) with the residual they are added to (the block's input, or its
LayerNorm output under ``apply_residual_connection_post_layernorm``) and ``norm=None``; the hook's
module is ``self_attention`` / ``mlp``. The ALiBi term is computed from the mask the
``attention_kv`` hook returns, so keys a prefix method prepends get ALiBi positions too.

Incremental decoding uses ``generation.KVCache``: key validity over the buffer gives each cached
key its ALiBi position, so cached decoding equals recomputation. ALiBi needs no position input;
``positions`` must be left ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models import hooks, layer_scan, registry
from peftjax.models.generation import KVCache
from peftjax.models.gpt2 import causal_mask_and_cache, default_positions, finish_cache, write_cache
from peftjax.models.layers import (Dense, Dropout, Embed, LayerNorm, attention_weights_and_output,
                                   last_token_score, normal_init, remat_block)


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """Architecture facts of a BLOOM model (from a transformers ``BloomConfig``); frozen and hashable."""

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @classmethod
    def from_hf(cls, hf: Any) -> "BloomConfig":
        """From a transformers ``BloomConfig`` (or any object with its attributes).

        ``pretraining_tp`` / ``slow_but_exact`` only change how Megatron sliced the matmuls (the
        same product, summed in another order), so they are accepted and ignored.
        """
        def get(name: str, default: Any) -> Any:
            value = getattr(hf, name, None)
            return default if value is None else value

        hidden = int(get("hidden_size", get("n_embed", cls.hidden_size)))
        heads = int(get("n_head", cls.n_head))
        if hidden % heads:
            raise ValueError(f"bloom: hidden_size ({hidden}) must be divisible by n_head ({heads})")
        eos = get("eos_token_id", ())
        eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad, bos = getattr(hf, "pad_token_id", None), getattr(hf, "bos_token_id", None)
        return cls(
            vocab_size=int(get("vocab_size", cls.vocab_size)),
            hidden_size=hidden,
            n_layer=int(get("n_layer", cls.n_layer)),
            n_head=heads,
            layer_norm_epsilon=float(get("layer_norm_epsilon", cls.layer_norm_epsilon)),
            initializer_range=float(get("initializer_range", cls.initializer_range)),
            apply_residual_connection_post_layernorm=bool(get("apply_residual_connection_post_layernorm",
                                                              False)),
            hidden_dropout=float(get("hidden_dropout", cls.hidden_dropout)),
            attention_dropout=float(get("attention_dropout", cls.attention_dropout)),
            tie_word_embeddings=bool(get("tie_word_embeddings", True)),
            pad_token_id=None if pad is None else int(pad),
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=eos,
        )


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes ``(num_heads,)`` float32, as transformers' ``_get_alibi_slopes`` (to 1 ulp).

    ``p = 2^floor(log2 n)``: ``base = 2^(-2^(-(log2 p - 3))) = 2^(-8/p)`` and slopes ``base^1..base^p``;
    for a non-power-of-two ``n`` the remaining ``n - p`` heads take ``base2^1, base2^3, ...`` with
    ``base2 = 2^(-8/(2p))`` (Press et al. 2022, reference ``get_slopes``).
    """
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be >= 1, got {num_heads}")
    def powers(base: float, exponents: np.ndarray) -> np.ndarray:
        # fp32 base as transformers, each power rounded once to fp32 (torch's fp32 pow may differ
        # from this by 1 ulp).
        return (np.float64(np.float32(base)) ** exponents.astype(np.float64)).astype(np.float32)

    p = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(2 ** (-(2 ** -(math.log2(p) - 3))), np.arange(1, 1 + p))
    if p != num_heads:
        remaining = min(p, num_heads - p)
        slopes = np.concatenate([slopes, powers(2 ** (-(2 ** -(math.log2(2 * p) - 3))),
                                                np.arange(1, 1 + 2 * remaining, 2))])
    return slopes.astype(np.float32)


def alibi_bias(key_valid: jax.Array, num_heads: int) -> jax.Array:
    """``(B, heads, 1, K)`` fp32 ALiBi term: ``slope_h · (cumsum(valid) - 1) · valid`` per key."""
    valid = key_valid.astype(jnp.int32)
    position = (jnp.cumsum(valid, axis=-1) - 1) * valid
    return jnp.asarray(alibi_slopes(num_heads))[None, :, None, None] * position[:, None, None, :].astype(jnp.float32)


def bloom_gelu(x: jax.Array) -> jax.Array:
    """BLOOM's tanh GELU with its own constants (transformers ``bloom_gelu_forward``)."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


# ------------------------------------------------------------------------------------- modules


class BloomAttention(nn.Module):
    """Self-attention with the per-head fused ``query_key_value`` and ALiBi."""

    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, layer_cache, cache_index, train: bool):
        c = self.config
        b, l, _ = h.shape
        heads, d = c.n_head, c.head_dim
        init = normal_init(c.initializer_range)
        qkv = Dense(3 * c.hidden_size, dtype=self.dtype, kernel_init=init, name="query_key_value")(h)
        qkv = qkv.reshape(b, l, heads, 3, d)   # per-head [q, k, v] (Megatron layout)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        k, v, new_cache = write_cache(layer_cache, cache_index, k, v, self.dtype)
        k, v, mask = hooks.active().attention_kv(self, k, v, mask)
        # Every query of a row sees all of the row's earlier real keys from its last slot, so the
        # last query row of the (post-hook) mask is the keys' validity.
        bias = alibi_bias(mask[:, 0, -1, :], heads).astype(self.dtype)
        dropout = None
        if train and c.attention_dropout > 0:
            drop = Dropout(c.attention_dropout)
            dropout = lambda p: drop(p, deterministic=False)
        out = attention_weights_and_output(q, k, v, mask, dropout, scale=d ** -0.5, bias=bias)
        out = Dense(c.hidden_size, dtype=self.dtype, kernel_init=init, name="dense")(out.reshape(b, l, heads * d))
        return Dropout(c.hidden_dropout)(out, deterministic=not train), new_cache


class BloomMLP(nn.Module):
    """``dense_4h_to_h(gelu(dense_h_to_4h(x)))`` then dropout."""

    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.config
        init = normal_init(c.initializer_range)
        h = Dense(4 * c.hidden_size, dtype=self.dtype, kernel_init=init, name="dense_h_to_4h")(x)
        h = Dense(c.hidden_size, dtype=self.dtype, kernel_init=init, name="dense_4h_to_h")(bloom_gelu(h))
        return Dropout(c.hidden_dropout)(h, deterministic=not train)


class BloomBlock(nn.Module):
    """``h = r + Attn(LN(h)); h = r' + MLP(LN(h))`` (``r`` = input, or LN output when
    ``apply_residual_connection_post_layernorm``)."""

    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, layer_cache, cache_index, train: bool):
        c = self.config
        post = c.apply_residual_connection_post_layernorm
        block_output = hooks.active().block_output
        x = LayerNorm(c.layer_norm_epsilon, self.dtype, name="input_layernorm")(h)
        attn = BloomAttention(c, self.dtype, name="self_attention")
        a, new_cache = attn(x, mask, layer_cache, cache_index, train)
        h = block_output(attn, "attention", a, x if post else h, None)
        x = LayerNorm(c.layer_norm_epsilon, self.dtype, name="post_attention_layernorm")(h)
        mlp = BloomMLP(c, self.dtype, name="mlp")
        return block_output(mlp, "ffn", mlp(x, train), x if post else h, None), new_cache


class BloomStack(nn.Module):
    """Holds blocks named "0", "1", ... so paths read ``transformer.h.3``."""

    config: BloomConfig
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False  # one lax.scan over the blocks (layer_scan.py) outside KV-cache decoding

    @nn.compact
    def __call__(self, h, mask, caches, cache_index, train: bool):
        if layer_scan.scanning(self, caches):
            # Every block reads the same mask and ALiBi slopes: nothing is picked per layer.
            return layer_scan.scan_stack(self, lambda: BloomBlock(self.config, self.dtype, parent=None),
                                         h, lambda i: (mask, None, cache_index, train),
                                         self.config.n_layer, self.remat, train), None
        block_cls = remat_block(BloomBlock, self.remat, static_argnums=(5,))
        new_caches = []
        for i in range(self.config.n_layer):
            h, new_cache = block_cls(self.config, self.dtype, name=str(i))(
                h, mask, None if caches is None else caches[i], cache_index, train)
            new_caches.append(new_cache)
        return h, (None if caches is None else new_caches)


class BloomModel(nn.Module):
    """The bare decoder: returns ``(hidden states, effective attention mask, new cache or None)``
    (as ``llama.LlamaModel``; hidden states include a prompt method's virtual tokens)."""

    config: BloomConfig
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False

    def setup(self) -> None:
        c = self.config
        self.word_embeddings = Embed(c.vocab_size, c.hidden_size, self.dtype,
                                     embedding_init=normal_init(c.initializer_range))
        self.word_embeddings_layernorm = LayerNorm(c.layer_norm_epsilon, self.dtype)
        self.h = BloomStack(c, self.dtype, self.remat, self.scan)
        self.ln_f = LayerNorm(c.layer_norm_epsilon, self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied LM head: ``h @ word_embeddings.T``."""
        return self.word_embeddings.attend(h)

    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None,
                 cache: KVCache | None = None):
        if positions is not None:
            raise ValueError("bloom uses ALiBi, which takes key positions from attention_mask; "
                             "explicit positions are not supported (pass positions=None)")
        input_ids = jnp.asarray(input_ids)
        attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        l_in = input_ids.shape[1]
        h = self.word_embeddings(input_ids)
        h, attention_mask, _ = hooks.active().embeddings(self, h, attention_mask, None)
        n_pre = h.shape[1] - l_in
        if n_pre < 0:
            raise ValueError("the embeddings hook shortened the sequence; only prepending is supported")
        if n_pre and cache is not None and cache.prefilled:
            h, attention_mask, n_pre = h[:, n_pre:], attention_mask[:, n_pre:], 0
        l = h.shape[1]
        valid = attention_mask.astype(bool)
        h = self.word_embeddings_layernorm(h)
        mask, cache, kv_valid, index = causal_mask_and_cache(valid, cache, n_pre)
        caches = None if cache is None else list(zip(cache.keys, cache.values))
        h, new_caches = self.h(h, mask, caches, index, train)
        h = self.ln_f(h)
        new_cache = None
        if cache is not None:  # next_position is kept for the generic cache bookkeeping only
            new_cache = finish_cache(cache, new_caches, kv_valid, index, l, valid, default_positions(valid, cache))
        return h, attention_mask, new_cache


class BloomForCausalLM(nn.Module):
    """Causal LM: logits ``(B, L_in, vocab)`` in fp32; ``(logits, new_cache)`` when given a cache."""

    config: BloomConfig
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False

    def setup(self) -> None:
        c = self.config
        self.transformer = BloomModel(c, self.dtype, self.remat, self.scan)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                                 kernel_init=normal_init(c.initializer_range))

    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None,
                 cache: KVCache | None = None):
        h, _, new_cache = self.transformer(input_ids, attention_mask, train, positions, cache)
        n_pre = h.shape[1] - input_ids.shape[1]
        if n_pre:
            h = h[:, n_pre:]
        logits = self.transformer.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


class BloomForSequenceClassification(nn.Module):
    """``score`` (no bias) on the last real token's hidden state (num_labels == 1: regression);
    transformers' "last non-pad token" is the rightmost ``attention_mask`` position when padding
    is masked."""

    config: BloomConfig
    num_labels: int
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        h, _, _ = BloomModel(self.config, self.dtype, self.remat, self.scan, name="transformer")(
            input_ids, attention_mask, train, positions)
        return last_token_score(h, input_ids, attention_mask, self.num_labels, self.dtype,
                                self.config.initializer_range)


def _build(config: BloomConfig, head: str, num_labels: int, dtype, remat: bool,
           scan_layers: bool = False) -> nn.Module:
    if head == "none":
        return BloomModel(config, dtype, remat, scan_layers)
    if head == "causal_lm":
        return BloomForCausalLM(config, dtype, remat, scan_layers)
    return BloomForSequenceClassification(config, num_labels, dtype, remat, scan_layers)


def _head_prefixes(config: BloomConfig, head: str) -> tuple[str, ...]:
    return ("score",) if head in ("classification", "regression") else ()


def _backbone_prefix(config: BloomConfig, head: str) -> str:
    return "" if head == "none" else "transformer"


FAMILY = registry.register_family(registry.Family(
    name="bloom",
    options=("scan_layers",),
    model_types=("bloom",),
    config_from_hf=BloomConfig.from_hf,
    build=_build,
    heads=("none", "causal_lm", "classification", "regression"),
    head_prefixes=_head_prefixes,
    backbone_prefix=_backbone_prefix,
    input_names=("input_ids", "attention_mask"),
))

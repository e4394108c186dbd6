"""GPT-2 (Radford et al. 2019, "Language models are unsupervised multitask learners") in Flax linen.

Module names are Hugging Face's (``transformer.wte``, ``transformer.h.0.attn.c_attn``,
``transformer.h.0.mlp.c_fc``, ``transformer.ln_f``), so checkpoints load by name through
``hf_io`` and PEFT's GPT-2 target (``c_attn``) carries over. The forward pass follows
transformers' ``modeling_gpt2``, which the parity tests check to 1e-4 against PyTorch:

* learned absolute position embeddings: ``h_0 = wte[x] + wpe[p]``, then dropout (``embd_pdrop``).
* pre-LayerNorm residual blocks (GPT-2 §2.3 moved LayerNorm to each sub-block's input and added
  a final one): ``h = h + Attn(LN_1(h));  h = h + MLP(LN_2(h))``, final ``ln_f``.
* fused query/key/value projection ``c_attn`` (hidden → 3·hidden, laid out ``[q | k | v]``, each
  ``heads × head_dim``), scaled dot-product attention with scale ``1/sqrt(head_dim)``
  (``scale_attn_weights``) and optionally ``1/(layer_idx + 1)`` more
  (``scale_attn_by_inverse_layer_idx``), causal AND padding mask, fp32 softmax.
* MLP ``c_proj(gelu_new(c_fc(x)))`` with ``n_inner`` (default 4·hidden) units; ``gelu_new`` is the
  tanh approximation ``0.5 x (1 + tanh(sqrt(2/π)(x + 0.044715 x³)))`` (Hendrycks & Gimpel 2016).
* the LM head is tied to ``wte`` (``tie_word_embeddings``, the default; an untied ``lm_head`` is
  supported too).

Weight layout: GPT-2's ``Conv1D`` stores its weight as ``(in, out)`` (the flax kernel layout), so
the family marks ``c_attn``/``c_proj``/``c_fc`` kernels as untransposed for ``hf_io``; the
sequence-classification head ``score`` is an ordinary ``nn.Linear`` and is transposed.

Positions: when none are given they are ``cumsum(attention_mask) - 1`` (clipped at 0), as in
``peftjax.models.llama``: equal to transformers' ``arange`` without left padding, and to what its
``generate`` computes for left-padded rows.

Hook points (``peftjax.models.hooks``): every Conv1D/Linear calls ``linear``; ``embeddings`` runs
right after the token lookup, before the position embeddings are added (a prompt method's virtual
tokens then take positions ``0..n-1``, as when PEFT feeds ``inputs_embeds``); ``attention_kv``
after the KV-cache update; each block calls ``block_output`` for its attention (``c_proj``'s
output after its dropout) and its MLP (output after dropout) with the block input they are added
to and ``norm=None`` (pre-LN: the sum is the output); the hook's module is ``attn`` / ``mlp``.
Incremental decoding uses ``generation.KVCache`` exactly as the Llama family does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models import hooks, layer_scan, registry
from peftjax.models.generation import KVCache
from peftjax.models.layers import (Dense, Dropout, Embed, LayerNorm, activation,
                                   attention_weights_and_output, last_token_score, normal_init,
                                   remat_block)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture facts of a GPT-2 model (from a transformers ``GPT2Config``); frozen and hashable."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int = 3072
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: tuple[int, ...] = (50256,)

    # Names the generation code and the method layer use for every decoder.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

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
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf: Any) -> "GPT2Config":
        """From a transformers ``GPT2Config`` (or any object with its attributes)."""
        def get(name: str, default: Any) -> Any:
            value = getattr(hf, name, None)
            return default if value is None else value

        if get("add_cross_attention", False):
            raise ValueError("gpt2: add_cross_attention=True (an encoder-decoder GPT-2) is not supported; "
                             "only the decoder-only GPT-2 is")
        n_embd = int(get("n_embd", cls.n_embd))
        n_head = int(get("n_head", cls.n_head))
        if n_embd % n_head:
            raise ValueError(f"gpt2: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        eos = get("eos_token_id", ())
        eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad, bos = getattr(hf, "pad_token_id", None), getattr(hf, "bos_token_id", None)
        return cls(
            vocab_size=int(get("vocab_size", cls.vocab_size)),
            n_positions=int(get("n_positions", cls.n_positions)),
            n_embd=n_embd,
            n_layer=int(get("n_layer", cls.n_layer)),
            n_head=n_head,
            n_inner=int(get("n_inner", 4 * n_embd)),
            activation_function=str(get("activation_function", cls.activation_function)),
            resid_pdrop=float(get("resid_pdrop", cls.resid_pdrop)),
            embd_pdrop=float(get("embd_pdrop", cls.embd_pdrop)),
            attn_pdrop=float(get("attn_pdrop", cls.attn_pdrop)),
            layer_norm_epsilon=float(get("layer_norm_epsilon", cls.layer_norm_epsilon)),
            initializer_range=float(get("initializer_range", cls.initializer_range)),
            scale_attn_weights=bool(get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(get("tie_word_embeddings", True)),
            pad_token_id=None if pad is None else int(pad),
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=eos,
        )


# --------------------------------------------------------------------- masks shared by decoders


def causal_mask_and_cache(valid: jax.Array, cache: KVCache | None, n_pre: int
                          ) -> tuple[jax.Array, KVCache | None, jax.Array | None, jax.Array | None]:
    """The attention mask of a decoder call, with or without a ``KVCache``.

    ``valid`` ``(B, L)`` bool marks real tokens of this call (after an ``embeddings`` hook added
    ``n_pre`` virtual tokens). Returns ``(mask (B, 1, L, K), cache, kv_valid, index)``: without a
    cache ``K = L`` and the mask is causal AND padding; with one, ``K = max_len``, slot ``j`` is
    visible from query slot ``i`` iff ``j <= i`` and it holds a real token (``kv_valid``, the
    cache's validity after writing this call), and ``index`` is where this call's tokens go.
    A not-yet-prefilled cache grows by ``n_pre`` slots for the virtual tokens.
    """
    b, l = valid.shape
    if cache is None:
        causal = jnp.tril(jnp.ones((l, l), bool))
        mask = causal[None, None] & valid[:, None, None, :]
        return jnp.broadcast_to(mask, (b, 1, l, l)), None, None, None
    if n_pre and not cache.prefilled:
        cache = cache.grow(n_pre)
    if l > cache.max_len:
        raise ValueError(f"{l} tokens do not fit a KV cache of max_len {cache.max_len}")
    index = cache.index.astype(jnp.int32)
    kv_valid = jax.lax.dynamic_update_slice(cache.mask, valid, (jnp.int32(0), index))
    q_slots = index + jnp.arange(l, dtype=jnp.int32)
    causal = jnp.arange(cache.max_len, dtype=jnp.int32)[None, :] <= q_slots[:, None]
    mask = causal[None, None] & kv_valid[:, None, None, :]
    return jnp.broadcast_to(mask, (b, 1, l, cache.max_len)), cache, kv_valid, index


def write_cache(layer_cache: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | None,
                k: jax.Array, v: jax.Array, dtype: Any):
    """Writes this call's keys/values ``(B, L, heads, d)`` into a layer's cache buffers at
    ``cache_index``; returns ``(k, v, new layer cache)`` where k/v now span the whole buffer."""
    if layer_cache is None:
        return k, v, None
    k_buf, v_buf = layer_cache
    start = (jnp.int32(0), cache_index, jnp.int32(0), jnp.int32(0))
    k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), start)
    v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), start)
    return k_buf.astype(dtype), v_buf.astype(dtype), (k_buf, v_buf)


def finish_cache(cache: KVCache, new_caches, kv_valid, index, l: int, valid, positions) -> KVCache:
    """The cache after a call: new buffers, validity, write index and each row's next position."""
    next_position = jnp.maximum(
        cache.next_position, jnp.max(jnp.where(valid, positions + 1, 0), axis=1).astype(jnp.int32))
    return cache.replace(keys=tuple(k for k, _ in new_caches), values=tuple(v for _, v in new_caches),
                         mask=kv_valid, index=index + l, next_position=next_position, prefilled=True)


def default_positions(valid: jax.Array, cache: KVCache | None) -> jax.Array:
    """``cumsum(valid) - 1`` (clipped at 0), continuing from the cache's next position."""
    start = 0 if cache is None else cache.next_position[:, None]
    return jnp.maximum(start + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)



# ------------------------------------------------------------------------------------- modules


class GPT2Attention(nn.Module):
    """Causal self-attention with the fused ``c_attn`` projection and an optional KV cache."""

    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, layer_cache, cache_index, train: bool):
        c = self.config
        b, l, _ = h.shape
        heads, d = c.n_head, c.head_dim
        init = normal_init(c.initializer_range)
        qkv = Dense(3 * c.n_embd, dtype=self.dtype, kernel_init=init, name="c_attn")(h)
        q, k, v = (t.reshape(b, l, heads, d) for t in jnp.split(qkv, 3, axis=-1))
        k, v, new_cache = write_cache(layer_cache, cache_index, k, v, self.dtype)
        k, v, mask = hooks.active().attention_kv(self, k, v, mask)
        scale = d ** -0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        dropout = None
        if train and c.attn_pdrop > 0:
            drop = Dropout(c.attn_pdrop)
            dropout = lambda p: drop(p, deterministic=False)
        out = attention_weights_and_output(q, k, v, mask, dropout, scale=scale)
        # HF initialises the residual projections with std / sqrt(2 n_layer) (GPT-2 §2.3).
        proj_init = normal_init(c.initializer_range / math.sqrt(2 * c.n_layer))
        out = Dense(c.n_embd, dtype=self.dtype, kernel_init=proj_init, name="c_proj")(out.reshape(b, l, heads * d))
        return Dropout(c.resid_pdrop)(out, deterministic=not train), new_cache


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` then residual dropout."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.config
        h = Dense(c.n_inner, dtype=self.dtype, kernel_init=normal_init(c.initializer_range), name="c_fc")(x)
        h = activation(c.activation_function)(h)
        h = Dense(c.n_embd, dtype=self.dtype,
                  kernel_init=normal_init(c.initializer_range / math.sqrt(2 * c.n_layer)), name="c_proj")(h)
        return Dropout(c.resid_pdrop)(h, deterministic=not train)


class GPT2Block(nn.Module):
    """Pre-LN block: ``h += Attn(ln_1(h)); h += MLP(ln_2(h))``."""

    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, mask, layer_cache, cache_index, train: bool):
        c = self.config
        block_output = hooks.active().block_output
        x = LayerNorm(c.layer_norm_epsilon, self.dtype, name="ln_1")(h)
        attn = GPT2Attention(c, self.layer_idx, self.dtype, name="attn")
        a, new_cache = attn(x, mask, layer_cache, cache_index, train)
        h = block_output(attn, "attention", a, h, None)
        x = LayerNorm(c.layer_norm_epsilon, self.dtype, name="ln_2")(h)
        mlp = GPT2MLP(c, self.dtype, name="mlp")
        return block_output(mlp, "ffn", mlp(x, train), h, None), new_cache


class GPT2Stack(nn.Module):
    """Holds blocks named "0", "1", ... so paths read ``transformer.h.3``."""

    config: GPT2Config
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False  # one lax.scan over the blocks (layer_scan.py) outside KV-cache decoding

    @nn.compact
    def __call__(self, h, mask, caches, cache_index, train: bool):
        c = self.config
        if self.scan and c.scale_attn_by_inverse_layer_idx:
            raise ValueError("scan_layers: this GPT-2 config scales each layer's attention by "
                             "1/(layer_idx + 1) (scale_attn_by_inverse_layer_idx), so its blocks "
                             "differ and cannot share one scanned body; set scan_layers=False")
        if layer_scan.scanning(self, caches):
            # The block's layer_idx only feeds that scaling: block 0's body serves every layer.
            return layer_scan.scan_stack(self, lambda: GPT2Block(c, 0, self.dtype, parent=None), h,
                                         lambda i: (mask, None, cache_index, train), c.n_layer,
                                         self.remat, train), None
        block_cls = remat_block(GPT2Block, self.remat, static_argnums=(5,))
        new_caches = []
        for i in range(self.config.n_layer):
            h, new_cache = block_cls(self.config, i, self.dtype, name=str(i))(
                h, mask, None if caches is None else caches[i], cache_index, train)
            new_caches.append(new_cache)
        return h, (None if caches is None else new_caches)


class GPT2Model(nn.Module):
    """The bare decoder: returns ``(hidden states, effective attention mask, new cache or None)``.

    As ``llama.LlamaModel``: hidden states cover a prompt method's prepended virtual tokens too;
    with a ``KVCache`` the tokens are written at ``cache.index`` and attend to the cached ones.
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False

    def setup(self) -> None:
        c = self.config
        init = normal_init(c.initializer_range)
        self.wte = Embed(c.vocab_size, c.n_embd, self.dtype, embedding_init=init)
        self.wpe = Embed(c.n_positions, c.n_embd, self.dtype, embedding_init=init)
        self.drop = Dropout(c.embd_pdrop)
        self.h = GPT2Stack(c, self.dtype, self.remat, self.scan)
        self.ln_f = LayerNorm(c.layer_norm_epsilon, self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied LM head: ``h @ wte.T``."""
        return self.wte.attend(h)

    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None,
                 cache: KVCache | None = None):
        input_ids = jnp.asarray(input_ids)
        attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        b, l_in = input_ids.shape
        h = self.wte(input_ids)
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
            positions = default_positions(valid, cache)
        elif n_pre:
            positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_pre, dtype=jnp.int32), (b, n_pre)),
                                         jnp.asarray(positions, jnp.int32) + n_pre], axis=1)
        positions = jnp.asarray(positions, jnp.int32)
        mask, cache, kv_valid, index = causal_mask_and_cache(valid, cache, n_pre)
        # The position table has n_positions rows and a gather would clamp silently beyond it.
        span = l if cache is None else cache.max_len
        if span > self.config.n_positions:
            raise ValueError(f"gpt2: {span} positions ({'sequence' if cache is None else 'KV cache'} "
                             f"length) exceed n_positions={self.config.n_positions}")
        h = self.drop(h + self.wpe(positions), deterministic=not train)

        caches = None if cache is None else list(zip(cache.keys, cache.values))
        h, new_caches = self.h(h, mask, caches, index, train)
        h = self.ln_f(h)
        new_cache = None if cache is None else finish_cache(cache, new_caches, kv_valid, index, l, valid,
                                                            positions)
        return h, attention_mask, new_cache


class GPT2LMHeadModel(nn.Module):
    """Causal LM: logits ``(B, L_in, vocab)`` in fp32; ``(logits, new_cache)`` when given a cache.

    ``lm_head`` exists only when the embeddings are untied (GPT-2 ties them: logits ``= h wteᵀ``).
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False

    def setup(self) -> None:
        c = self.config
        self.transformer = GPT2Model(c, self.dtype, self.remat, self.scan)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                                 kernel_init=normal_init(c.initializer_range))

    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None,
                 cache: KVCache | None = None):
        h, _, new_cache = self.transformer(input_ids, attention_mask, train, positions, cache)
        n_pre = h.shape[1] - input_ids.shape[1]
        if n_pre:  # a prompt method's virtual tokens predict nothing the caller asked for
            h = h[:, n_pre:]
        logits = self.transformer.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


class GPT2ForSequenceClassification(nn.Module):
    """``score`` (no bias) on the last real token's hidden state (num_labels == 1: regression).

    transformers pools at the rightmost token that differs from ``pad_token_id``; the rightmost
    position of ``attention_mask`` is that token whenever padding is masked.
    """

    config: GPT2Config
    num_labels: int
    dtype: Any = jnp.float32
    remat: bool | str = False
    scan: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, train: bool = False, positions=None):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        h, _, _ = GPT2Model(self.config, self.dtype, self.remat, self.scan, name="transformer")(
            input_ids, attention_mask, train, positions)
        return last_token_score(h, input_ids, attention_mask, self.num_labels, self.dtype,
                                self.config.initializer_range)


def _build(config: GPT2Config, head: str, num_labels: int, dtype, remat: bool,
           scan_layers: bool = False) -> nn.Module:
    if head == "none":
        return GPT2Model(config, dtype, remat, scan_layers)
    if head == "causal_lm":
        return GPT2LMHeadModel(config, dtype, remat, scan_layers)
    return GPT2ForSequenceClassification(config, num_labels, dtype, remat, scan_layers)


def _head_prefixes(config: GPT2Config, head: str) -> tuple[str, ...]:
    # The LM head is pretrained (tied to wte), not a task head.
    return ("score",) if head in ("classification", "regression") else ()


def _backbone_prefix(config: GPT2Config, head: str) -> str:
    return "" if head == "none" else "transformer"


FAMILY = registry.register_family(registry.Family(
    name="gpt2",
    options=("scan_layers",),
    model_types=("gpt2",),
    config_from_hf=GPT2Config.from_hf,
    build=_build,
    heads=("none", "causal_lm", "classification", "regression"),
    head_prefixes=_head_prefixes,
    backbone_prefix=_backbone_prefix,
    input_names=("input_ids", "attention_mask"),
    untransposed_kernels=r"\.(c_attn|c_proj|c_fc)\.kernel$",
))

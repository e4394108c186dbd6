"""KV cache and autoregressive generation for the decoder family.

Why a preallocated cache: each decode step must be one compiled function with static shapes.
``KVCache`` holds, per layer, key and value buffers of shape ``(B, max_len, kv_heads, head_dim)``
that the model writes with ``lax.dynamic_update_slice`` at ``index``, plus a ``(B, max_len)``
validity mask (padding) and each row's next position. Attention over the whole buffer is masked
by slot (causal: slot ``j`` is visible to the query in slot ``i`` iff ``j <= i`` and slot ``j``
holds a real token), so all rows of a left-padded batch advance in lock-step.

Generation (``generate``) = prefill the prompt into the cache, then repeat
``decode_step`` → ``sample_next``. The step-wise API is public because methods such as proxy
tuning (Liu et al. 2024) combine the next-token logits of several models before sampling::

    cache = init_cache(model, batch, prompt_len + max_new_tokens)
    logits, cache = prefill(model, params, input_ids, attention_mask, cache)
    for t in range(max_new_tokens):
        token = sample_next(logits, jax.random.fold_in(rng, t), temperature, top_p)
        logits, cache = decode_step(model, params, token, cache)

Logits processing follows transformers' warpers (``generation/logits_process.py``):
temperature ``l / T`` (``TemperatureLogitsWarper``) then nucleus filtering (Holtzman et al.
2020, ``TopPLogitsWarper``): sort ascending, drop tokens whose cumulative probability is
``<= 1 - top_p``, always keep the most likely token; ``temperature == 0`` means greedy argmax.

Hooks: generation just calls the model, so PEFT methods active through ``hooks.use`` apply. Jax's
compilation cache cannot see the active hooks, so ``generate`` reuses compiled code only while no
hooks are active and compiles afresh under hooks (wrap your own ``jax.jit`` around ``generate``
inside the ``with hooks.use(...)`` block to compile once per traced call instead).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from peftjax.models import hooks


@struct.dataclass
class KVCache:
    """Preallocated per-layer key/value buffers (a pytree; ``prefilled`` is static).

    Attributes:
      keys, values: per layer, ``(B, max_len, kv_heads, head_dim)`` (post-RoPE keys).
      mask: ``(B, max_len)`` bool, True where a slot holds a real (non-padding) token.
      index: ``()`` int32, number of slots written (the next write position).
      next_position: ``(B,)`` int32, the RoPE position of each row's next real token.
      prefilled: False until the first model call; a prompt method's virtual tokens are stored
        on that call only (static, so prefill and decode compile separately).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    next_position: jax.Array
    prefilled: bool = struct.field(pytree_node=False, default=False)

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def grow(self, n: int) -> "KVCache":
        """``n`` more empty slots at the end (used when a prompt method prepends ``n`` tokens)."""
        pad = lambda x: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
        return self.replace(keys=tuple(pad(k) for k in self.keys),
                            values=tuple(pad(v) for v in self.values), mask=pad(self.mask))


def _module(model: Any):
    """The flax module of a ``registry.Model`` (or the module itself)."""
    return getattr(model, "module", model)


def init_cache(model: Any, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for ``max_len`` tokens (prompt + new tokens; a prompt method's virtual
    tokens are added by the prefill itself). ``model``: a ``registry.Model`` or its module; its
    config must have ``num_hidden_layers``, ``num_key_value_heads`` and ``head_dim``."""
    module = _module(model)
    c = module.config
    dtype = dtype if dtype is not None else getattr(module, "dtype", jnp.float32)
    shape = (batch_size, max_len, c.num_key_value_heads, c.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers))
    return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers)),
                   mask=jnp.zeros((batch_size, max_len), bool), index=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((batch_size,), jnp.int32))


def last_token_logits(logits: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """``(B, L, V) -> (B, V)``: the logits at each row's rightmost real token (left or right padding)."""
    valid = attention_mask.astype(bool)
    idx = valid.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]


def prefill(model: Any, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None,
            cache: KVCache, positions: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Runs the prompt through the model into ``cache``; returns the next-token logits ``(B, V)``
    (at each row's last real token) and the filled cache."""
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    logits, cache = _module(model).apply({"params": params}, input_ids, attention_mask, train=False,
                                         positions=positions, cache=cache)
    return last_token_logits(logits, attention_mask), cache


def decode_step(model: Any, params: dict, tokens: jax.Array, cache: KVCache,
                attention_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Feeds one token per row ``(B,)``; returns its next-token logits ``(B, V)`` and the cache.

    Static shapes throughout (the cache is preallocated), so ``jax.jit`` compiles it once. The
    caller keeps ``cache.index < cache.max_len`` (``dynamic_update_slice`` clamps, it does not
    raise). With ``rope_type="dynamic"`` cached keys keep the frequencies of their own step
    (as in transformers), so past ``max_position_embeddings`` cached and recomputed logits differ.
    """
    tokens = tokens.reshape(-1, 1)
    mask = jnp.ones_like(tokens) if attention_mask is None else attention_mask.reshape(-1, 1)
    logits, cache = _module(model).apply({"params": params}, tokens, mask, train=False, cache=cache)
    return logits[:, 0], cache


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """``logits / T`` (transformers' TemperatureLogitsWarper); ``T`` in (0, inf)."""
    return logits if temperature == 1.0 else logits / temperature


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering (Holtzman et al. 2020) exactly as transformers' ``TopPLogitsWarper``.

    With tokens sorted by ascending logit and ``c_k`` the cumulative softmax up to rank ``k``,
    tokens with ``c_k <= 1 - top_p`` get ``-inf``; the most likely token is always kept. The
    survivors are the smallest set whose probability mass is ``>= top_p``.
    """
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
    remove_sorted = cumulative <= (1.0 - top_p)
    remove_sorted = remove_sorted.at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def process_logits(logits: jax.Array, temperature: float = 1.0, top_p: float = 1.0) -> jax.Array:
    """Temperature then top-p, the order transformers applies its warpers in."""
    logits = logits.astype(jnp.float32)
    if temperature > 0:
        logits = apply_temperature(logits, temperature)
    return top_p_filter(logits, top_p)


def sample_next(logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0,
                top_p: float = 1.0) -> jax.Array:
    """Next token per row ``(B,)`` int32 from logits ``(B, V)``.

    ``temperature == 0``: greedy ``argmax`` (rng unused). Otherwise a draw from
    ``softmax(top_p_filter(logits / T))``; deterministic for a given ``rng``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng")
    return jax.random.categorical(rng, process_logits(logits, temperature, top_p), axis=-1).astype(jnp.int32)


def _eos_ids(eos_token_id: int | Sequence[int] | None, config: Any) -> tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", ()) or ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(int(e) for e in eos_token_id)


def decode_loop(logits: jax.Array, forward: Callable, carry: Any, *, max_new_tokens: int,
                rng: jax.Array | None, temperature: float, top_p: float, pad: int,
                eos_arr: jax.Array) -> jax.Array:
    """The shared token loop of every generator (decoder-only here, encoder-decoder in t5.py).

    ``logits`` are the first step's next-token logits ``(batch, vocab)``; ``forward(token, t,
    carry) -> (logits, carry)`` feeds the token chosen at step ``t`` and returns the next logits
    (through a KV cache or a recomputed buffer, as the caller decides). Step ``t`` samples with
    ``fold_in(rng, t)`` (greedy when ``rng`` is None); a row that has emitted an EOS id pads from
    then on, and the loop (a ``while_loop``) stops once every row is done. Returns the
    ``(batch, max_new_tokens)`` new tokens.
    """
    b = logits.shape[0]

    def sample(logits, t, done):
        key = None if rng is None else jax.random.fold_in(rng, t)
        token = sample_next(logits, key, temperature, top_p)
        token = jnp.where(done, pad, token)
        return token, done | jnp.isin(token, eos_arr)

    out = jnp.full((b, max_new_tokens), pad, jnp.int32)
    token, done = sample(logits, 0, jnp.zeros((b,), bool))
    out = out.at[:, 0].set(token)

    def cond(state):
        t, _, done, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, out, done, carry = state
        prev = jax.lax.dynamic_slice_in_dim(out, t - 1, 1, axis=1)[:, 0]
        logits, carry = forward(prev, t - 1, carry)
        token, done = sample(logits, t, done)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (jnp.int32(0), t))
        return t + 1, out, done, carry

    _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, done, carry))
    return out


def _generate_impl(module, max_new_tokens: int, temperature: float, top_p: float,
                   eos: tuple[int, ...], pad: int, use_cache: bool,
                   params, input_ids, attention_mask, rng):
    b, l = input_ids.shape
    mask = attention_mask.astype(jnp.int32)
    total = l + max_new_tokens
    apply = functools.partial(module.apply, {"params": params}, train=False)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    if use_cache:
        cache = init_cache(module, b, total)
        logits, cache = prefill(module, params, input_ids, mask, cache)
        carry = cache

        def forward(token, t, cache):
            return decode_step(module, params, token, cache)
    else:
        # Full recomputation on a fixed-size buffer: future slots are masked out and causal
        # attention keeps them from influencing earlier positions, so one compiled forward serves
        # every step.
        buf = jnp.concatenate([input_ids.astype(jnp.int32), jnp.full((b, max_new_tokens), pad, jnp.int32)], 1)
        mbuf = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), jnp.int32)], 1)
        logits = last_token_logits(apply(buf, mbuf)[:, :l], mask)
        carry = (buf, mbuf)

        def forward(token, t, carry):
            buf, mbuf = carry
            buf = jax.lax.dynamic_update_slice(buf, token[:, None], (jnp.int32(0), l + t))
            mbuf = jax.lax.dynamic_update_slice(mbuf, jnp.ones((b, 1), jnp.int32), (jnp.int32(0), l + t))
            out = jax.lax.dynamic_slice_in_dim(apply(buf, mbuf), l + t, 1, axis=1)[:, 0]
            return out, (buf, mbuf)

    out = decode_loop(logits, forward, carry, max_new_tokens=max_new_tokens, rng=rng,
                      temperature=temperature, top_p=top_p, pad=pad, eos_arr=eos_arr)
    return jnp.concatenate([input_ids.astype(jnp.int32), out], axis=1)


_STATIC = (0, 1, 2, 3, 4, 5, 6)
_generate_jit = jax.jit(_generate_impl, static_argnums=_STATIC)


def generate(model: Any, params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             max_new_tokens: int = 32, *, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, use_cache: bool = True) -> jax.Array:
    """Autoregressive generation; returns ``(B, L + max_new_tokens)`` int32: prompt then new tokens.

    Args:
      model: a ``registry.Model`` (or its flax module) of a causal LM accepting ``cache=``.
      input_ids, attention_mask: ``(B, L)`` prompt; left padding (the usual batched layout) and
        right padding both work: each row continues after its last real token, with positions
        counted over real tokens only.
      temperature: 0 = greedy; otherwise sample from ``softmax(logits / temperature)``.
      top_p: nucleus filtering as transformers' ``TopPLogitsWarper``.
      rng: PRNG key (required when sampling); step ``t`` uses ``fold_in(rng, t)``, so the output
        is deterministic for a given key and identical with and without the cache.
      eos_token_id: id(s) that end a row; ``None`` = the config's eos ids, ``()`` = never stop.
        After a row's eos the row is filled with ``pad_token_id`` (default: the config's pad id,
        else the first eos id, else 0); generation stops early once every row has ended.
      use_cache: False recomputes the full sequence each step (the reference for the cache).
    """
    module = _module(model)
    config = module.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = (jnp.ones_like(input_ids) if attention_mask is None
                      else jnp.asarray(attention_mask, jnp.int32))
    if max_new_tokens < 1:
        return input_ids
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng for determinism")
    eos = _eos_ids(eos_token_id, config)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    static = (module, int(max_new_tokens), float(temperature), float(top_p), eos, int(pad_token_id),
              bool(use_cache))
    if type(hooks.active()) is hooks.Hooks:  # no method active: the compiled code can be reused
        fn = _generate_jit
    else:
        # The trace depends on the active hooks, which jax's cache key cannot see; jax caches
        # traces per Python function, so a fresh function (not a fresh jit of the same one).
        def traced(*args):
            return _generate_impl(*args)

        fn = jax.jit(traced, static_argnums=_STATIC)
    return fn(*static, params, input_ids, attention_mask, rng)

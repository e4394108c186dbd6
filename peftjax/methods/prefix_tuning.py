"""Prefix tuning (Li & Liang, ACL 2021): trainable key/value prefixes at every attention layer.

Every attention layer ``l`` attends over ``p`` extra positions whose keys and values are free
parameters ``P_k^l, P_v^l ∈ R^{p × kv_heads × head_dim}`` (Li & Liang §4.2: the prefix
activations ``h_i = P_θ[i, :]`` for ``i ∈ P_idx`` at every layer), concatenated before the
layer's own keys and values::

    Attn(Q, [P_k^l; K], [P_v^l; V]),   mask = [1 … 1 | padding/causal mask]

so the plain (folded) method has ``2 · L · p · (kv_heads · head_dim)`` params: 2·12·p·768 on
roberta-base, 2·32·p·4096 on llama2-7b (``kv_heads · head_dim = 4096``).

Details, each as the reference implementation (HF PEFT ``PrefixTuningConfig`` /
``PrefixEncoder``, which passes the prefixes as ``past_key_values``):

* **Keys are not rotated.** The prefixes enter after RoPE (the ``attention_kv`` hook runs after
  it, as past keys in transformers' cache are stored rotated and never touched again), so a
  prefix key is a raw vector learned directly in rotated space.
* **Positions do not move.** Real tokens keep positions ``0, 1, …``: the prefixes are not
  tokens, and a prefixed model's position handling (padding, the KV cache) stays the base
  model's. This is the one place where PEFT differs: it hands the prefixes to transformers as a
  p-long ``past_key_values`` cache, so transformers numbers the real tokens from ``p`` (RoPE /
  learned positions shifted by p). With the same weights our logits equal PEFT's prefix cache
  read at positions from 0, and equal PEFT's default forward when given positions from ``p``
  (``method.apply(..., positions=p + arange)`` on decoders); both checked to 1e-4 in the tests.
* **Every attention layer.** On an encoder-decoder (T5) that is encoder self-attention, decoder
  self-attention and cross-attention, each with its own prefixes (PEFT prefixes only the decoder,
  sharing one prefix between its self- and cross-attention).
* **Grouped-query attention.** Prefixes have ``kv_heads`` heads (PEFT sizes its ``token_dim``
  as ``num_key_value_heads · head_dim`` for GQA models); each is shared by its query group.
* **Sliding-window layers** (Mistral, Gemma 2/3 local layers, Qwen with windows). PEFT's prefixes
  are the first p slots of transformers' cache, so a layer with window W stops showing them to a
  token ``W - p`` slots in (prefix ``j`` is visible to the query in slot ``i`` iff
  ``j > p + i - W``); ``windowed=True`` (default) does the same, equal to PEFT to 1e-4 (tests).
  Slots count left padding, as PEFT's cache does, so there a left-padded row's prefixes leave
  the window earlier than the unpadded row's. ``windowed=False`` keeps them visible to every
  query, as on full-attention layers.
* **Padding and the KV cache.** Prefix columns are otherwise always attendable, by every query. The hook
  is called after the KV-cache update, so prefixes are never written into the cache: they are
  prepended afresh at every prefill/decode step, and cached decoding equals recomputation.
* **No dropout** on the prefixes (PEFT has none; attention dropout still applies to the
  attention probabilities over prefix and tokens alike).

Reparameterisation (Li & Liang §4.3: optimising ``P`` directly is unstable, so
``P = MLP_θ(P'_θ)`` with a smaller matrix ``P'``; after training only ``P`` is kept). As PEFT's
``prefix_projection=True``::

    E ∈ R^{p × d}                      (d = kv_heads · head_dim, PEFT's ``token_dim``)
    P = tanh(E W1 + b1) W2 + b2        W1: d × m, W2: m × 2·L·d   (m = ``encoder_hidden_size``)

and the row ``P[i]`` splits as ``(L, 2, kv_heads, head_dim)`` — layer ``l``'s key then value,
PEFT's ``past_key_values`` layout. ``m`` defaults to ``d`` (PEFT's default when
``encoder_hidden_size`` is unset; Li & Liang's code used a 512-wide hidden layer). Training
then updates ``p·d + d·m + m + m·2Ld + 2Ld`` params; ``fold`` evaluates the MLP once and
returns the plain prefixes, and ``folded()`` is the method that runs them — the form that is
saved (``saving.save_adapter`` calls ``for_saving``) and used at inference, with outputs equal to
the unfolded ones. Training checkpoints keep the MLP (a resumed run goes on training it). ``count_params`` reports
the folded count (what the adapted model carries, as the paper counts it); ``report()`` (in
``result.json``) and ``training_params`` give the count with the MLP.

Init as PEFT: ``E`` (or the plain prefixes) ~ N(0, 1) like ``torch.nn.Embedding``; ``W``, ``b``
~ U(-1/√fan_in, 1/√fan_in) like ``torch.nn.Linear``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.methods import core
from peftjax.models import hooks as hooks_lib

ENCODER = "prefix_encoder"   # key prefix of the reparameterisation's params (not a model site)
KEY, VALUE = "prefix_key", "prefix_value"


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig:
    num_virtual_tokens: int = 20     # p
    prefix_projection: bool = True   # train through the MLP (Li & Liang §4.3)
    encoder_hidden_size: int = 0     # m; 0 = d (kv_heads · head_dim), PEFT's default
    # Sliding-window layers: the prefixes sit in the p slots before the first token (PEFT's cache)
    # and leave a query's window once it is W - p slots past them; False: always visible.
    windowed: bool = True


class PrefixHooks(hooks_lib.Hooks):
    """Prepends each layer's (p, kv_heads, head_dim) key/value prefixes; prefix columns visible
    to every query, except on a sliding-window layer (``windows[site] = W``), where prefix ``j``
    is visible to the query in slot ``i`` iff ``j > p + i - W`` (PEFT's prefixes are the cache's
    first p slots, so the window reaches them from ``p + i``)."""

    def __init__(self, prefixes: dict[str, tuple[jax.Array, jax.Array]],
                 windows: dict[str, int] | None = None):
        self.prefixes = prefixes
        self.windows = windows or {}

    def attention_kv(self, module, key, value, mask):
        site = hooks_lib.site(module)
        if site not in self.prefixes:
            raise ValueError(f"prefix_tuning has no prefixes for attention site {site!r}; it was "
                             f"set up for {sorted(self.prefixes)} (a different model?)")
        pk, pv = self.prefixes[site]
        b, p = key.shape[0], pk.shape[0]
        pk = jnp.broadcast_to(pk.astype(key.dtype)[None], (b,) + pk.shape)
        pv = jnp.broadcast_to(pv.astype(value.dtype)[None], (b,) + pv.shape)
        visible = jnp.ones(mask.shape[:-1] + (p,), bool)
        window = self.windows.get(site)
        if window is not None:
            # A real query's slot is its last visible key (causal: itself); padded queries'
            # rows do not matter. Slots are cache slots with a KV cache, so decoding agrees.
            k = mask.shape[-1]
            slot = k - 1 - jnp.argmax(mask[..., ::-1].astype(jnp.int32), axis=-1)   # (B, 1, Q)
            visible = jnp.arange(p) > (p + slot[..., None] - window)
        return (jnp.concatenate([pk, key], axis=1), jnp.concatenate([pv, value], axis=1),
                jnp.concatenate([visible, mask.astype(bool)], axis=-1))


def _linear_init(rng: jax.Array, fan_in: int, fan_out: int) -> tuple[jax.Array, jax.Array]:
    """torch.nn.Linear's default init: kernel and bias ~ U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / np.sqrt(fan_in)
    k_rng, b_rng = jax.random.split(rng)
    return (jax.random.uniform(k_rng, (fan_in, fan_out), jnp.float32, -bound, bound),
            jax.random.uniform(b_rng, (fan_out,), jnp.float32, -bound, bound))


@core.register("prefix_tuning")
class PrefixTuning(core.Method):
    Config = PrefixTuningConfig
    family = "additional"

    def validate(self) -> None:
        c = self.config
        core.check_range("prefix_tuning", "num_virtual_tokens", c.num_virtual_tokens,
                         "an integer >= 1", isinstance(c.num_virtual_tokens, int)
                         and not isinstance(c.num_virtual_tokens, bool) and c.num_virtual_tokens >= 1)
        core.check_range("prefix_tuning", "prefix_projection", c.prefix_projection, "True or False",
                         isinstance(c.prefix_projection, bool))
        core.check_range("prefix_tuning", "windowed", c.windowed, "True or False", isinstance(c.windowed, bool))
        core.check_range("prefix_tuning", "encoder_hidden_size", c.encoder_hidden_size,
                         "an integer >= 0 (0 = kv_heads * head_dim)",
                         isinstance(c.encoder_hidden_size, int) and c.encoder_hidden_size >= 0)
        if not self.sites.attention:
            raise ValueError("prefix_tuning needs attention layers with the attention_kv hook; "
                             f"model {type(self.model.module).__name__} has none")
        shapes = {(v["kv_heads"], v["head_dim"]) for v in self.sites.attention.values()}
        if len(shapes) != 1:
            raise ValueError("prefix_tuning needs the same (kv_heads, head_dim) at every attention "
                             f"layer (one prefix encoder feeds them all); found {sorted(shapes)}")
        self.layers = list(self.sites.attention)     # in call order: layer 0, 1, ...
        (self.kv_heads, self.head_dim), = shapes
        self.token_dim = self.kv_heads * self.head_dim
        self.hidden = c.encoder_hidden_size or self.token_dim

    # -- params ---------------------------------------------------------------------------
    def init(self, rng, base, ctx):
        c = self.config
        p, d, L = c.num_virtual_tokens, self.token_dim, len(self.layers)
        if not c.prefix_projection:
            table = jax.random.normal(rng, (p, 2 * L * d), jnp.float32)  # PEFT's Embedding(p, 2Ld)
            return self._split(table)
        e_rng, r1, r2 = jax.random.split(rng, 3)
        w1, b1 = _linear_init(r1, d, self.hidden)
        w2, b2 = _linear_init(r2, self.hidden, 2 * L * d)
        return {f"{ENCODER}.embedding": jax.random.normal(e_rng, (p, d), jnp.float32),
                f"{ENCODER}.transform.0.kernel": w1, f"{ENCODER}.transform.0.bias": b1,
                f"{ENCODER}.transform.2.kernel": w2, f"{ENCODER}.transform.2.bias": b2}

    def _split(self, table: jax.Array) -> core.Flat:
        """``(p, 2·L·d)`` rows → per-layer ``(p, kv_heads, head_dim)`` keys and values."""
        p = table.shape[0]
        kv = table.reshape(p, len(self.layers), 2, self.kv_heads, self.head_dim)
        out = {}
        for i, site in enumerate(self.layers):
            out[f"{site}.{KEY}"] = kv[:, i, 0]
            out[f"{site}.{VALUE}"] = kv[:, i, 1]
        return out

    def prefix_table(self, added: core.Flat) -> jax.Array:
        """The ``(p, 2·L·d)`` prefix matrix P: the MLP's output, or the plain prefixes stacked.

        This is the tensor PEFT saves as ``prompt_embeddings`` for a prefix-tuning adapter (PEFT
        folds its MLP on saving too)."""
        if self.config.prefix_projection:
            g = lambda n: added[f"{ENCODER}.{n}"].astype(jnp.float32)
            h = jnp.tanh(g("embedding") @ g("transform.0.kernel") + g("transform.0.bias"))
            return h @ g("transform.2.kernel") + g("transform.2.bias")
        rows = [jnp.stack([added[f"{s}.{KEY}"], added[f"{s}.{VALUE}"]], axis=1) for s in self.layers]
        p = self.config.num_virtual_tokens
        return jnp.stack(rows, axis=1).reshape(p, 2 * len(self.layers) * self.token_dim)

    def fold(self, added: core.Flat) -> core.Flat:
        """Plain per-layer prefixes (the MLP evaluated once and dropped); identity when folded."""
        if not self.config.prefix_projection:
            return dict(added)
        return self._split(self.prefix_table(added))

    def folded(self) -> "PrefixTuning":
        """The same method without the reparameterisation: it runs ``fold(added)``."""
        return PrefixTuning(dataclasses.replace(self.config, prefix_projection=False), self.model,
                            self.sites)

    def fold_trainable(self, trainable: dict) -> dict:
        """A trainable tree for ``folded()``: folded prefixes, base and head unchanged."""
        return {**trainable, "added": self.fold(trainable["added"])}

    # -- forward --------------------------------------------------------------------------
    def hooks(self, added, state, *, train, rng):
        plain = self.fold(added)   # the MLP runs once per forward, outside the layers
        return PrefixHooks({s: (plain[f"{s}.{KEY}"], plain[f"{s}.{VALUE}"]) for s in self.layers},
                           self.windows() if self.config.windowed else None)

    def windows(self) -> dict[str, int]:
        """The attention sites of sliding-window layers and their windows (families whose
        config says ``attention_window(layer)``: Mistral, Qwen2/3, Gemma 2/3)."""
        window_of = getattr(self.model.config, "attention_window", None)
        out = {}
        for site in self.layers if window_of is not None else ():
            found = re.search(r"(?:^|\.)layers\.(\d+)\.", site)
            window = window_of(int(found.group(1))) if found else None
            if window is not None:
                out[site] = int(window)
        return out

    # -- accounting -----------------------------------------------------------------------
    def count_added(self, abstract_base) -> int:
        """Folded count ``2 · L · p · kv_heads · head_dim`` (what the adapted model carries)."""
        return 2 * len(self.layers) * self.config.num_virtual_tokens * self.token_dim

    def training_params(self) -> int:
        """Params updated during training: the folded count, or with the MLP
        ``p·d + d·m + m + m·2Ld + 2Ld``."""
        if not self.config.prefix_projection:
            return self.count_added(None)
        p, d, m, L = self.config.num_virtual_tokens, self.token_dim, self.hidden, len(self.layers)
        return p * d + d * m + m + m * 2 * L * d + 2 * L * d

    def accounting(self) -> dict:
        """The folded count is what the adapter carries; training updates the MLP too."""
        rule = (f"trainable_params counts the folded prefixes 2*L*p*d = 2*{len(self.layers)}*"
                f"{self.config.num_virtual_tokens}*{self.token_dim}; training updates "
                f"{self.training_params()} params"
                + (f" (embedding + MLP, hidden {self.hidden})" if self.config.prefix_projection else ""))
        return {"count_rule": rule, "training_params": self.training_params()}

    def report(self, trainable, state) -> dict:
        return {"prefix_tuning_training_params": self.training_params(),
                "prefix_tuning_folded_params": self.count_added(None)}

    # -- saving ---------------------------------------------------------------------------
    def for_saving(self, trainable: dict) -> tuple["PrefixTuning", dict]:
        """What ``peftjax.methods.saving.save_adapter`` stores: the folded method and prefixes
        (``load_adapter`` then rebuilds the plain-prefix method, equal in outputs)."""
        return self.folded(), self.fold_trainable(trainable)

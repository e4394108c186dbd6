"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024, Eq. 5 and §4.3).

For each targeted linear layer with frozen kernel W0 (flax layout, (in, out))::

    W' = m · (W0 + s·A B) / ||W0 + s·A B||_c

where ``||·||_c`` is the L2 norm of each OUTPUT unit's weight vector: torch's
``norm(W, dim=1)`` on the (out, in) weight, i.e. axis 0 of the flax (in, out) kernel, a vector of
shape (out,). The magnitude m (out,) is trainable and initialised to ||W0||_c, so the adapted
model starts equal to the base. The direction's norm is treated as a constant (§4.3: "detaching
it from the gradient graph"; PEFT ``lora/dora.py`` detaches both the LoRA weight inside the norm
and the norm itself): here ``jax.lax.stop_gradient``.

Forward (PEFT's ``DoraLinearLayer``), never materialising W'. With n = ||W0 + s·A B||_c (one
(in, out) matrix per target per step, as PEFT computes it) and the hook's y = x W0 + bias::

    y' = (m / n) · (x W0 + s·x A B) + bias            (no dropout, or evaluation)

With dropout p > 0 in training PEFT adds to the *un-dropped* base output
``(m/n - 1) · (x̃ W0) + (m/n) · s · x̃ A B`` with x̃ = dropout(x): the base path keeps the clean
input, the re-scaled part sees the dropped one (one extra x̃ W0 matmul, as in PEFT).

Everything else (targets, rank, alpha, dropout, rsLoRA, init incl. PiSSA) is LoRA's. Defaults:
PEFT's (``use_dora=True`` on a LoraConfig); the paper's commonsense setting is LLaMA-7B,
q,k,v,up,down, r 32, alpha 64 (``configs/methods/dora.py``).

Merge: W' above, bias unchanged. Unmerge needs n, which cannot be recovered from W' alone (the
merged columns have norm |m|): like PEFT's ``_cache_store("...-weight_norm")``, ``merge`` records
the norms it used and ``unmerge`` requires a preceding ``merge`` of the same adapter. The cache
lives on the method instance, so call ``merge``/``unmerge`` eagerly, not inside ``jax.jit``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.methods import core, lora
from peftjax.models import hooks as hooks_lib


@dataclasses.dataclass(frozen=True)
class DoRAConfig(lora.LoRAConfig):
    pass


def column_norm(kernel: jax.Array) -> jax.Array:
    """||W||_c per output unit of a flax (in, out) kernel: shape (out,)."""
    return jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=0))


class DoRAHooks(hooks_lib.Hooks):
    def __init__(self, method: "DoRA", added: core.Flat, train: bool):
        self.method, self.added, self.train = method, added, train

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        if site not in self.method.targets:
            return y
        return self.method.dora_output(module, site, x, y, kernel, bias, self.added, self.train)


@core.register("dora")
class DoRA(lora.LoRA):
    """LoRA plus a trainable per-output-unit magnitude; the direction is re-normalised."""

    Config = DoRAConfig

    def init(self, rng, base, ctx):
        added = super().init(rng, base, ctx)
        for site in self.targets:
            kernel = base[site + ".kernel"]  # W0 (before any PiSSA residual): m0 = ||W0||_c
            added[site + ".lora_magnitude"] = column_norm(kernel).astype(kernel.dtype)
        return added

    def hooks(self, added, state, *, train, rng):
        return DoRAHooks(self, added, train)

    def weight_norm(self, site: str, kernel, added) -> jax.Array:
        """n = ||W0 + s·A B||_c, detached (a constant for the gradient)."""
        w = kernel.astype(jnp.float32) + self.delta_weight(site, jax.lax.stop_gradient(added)
                                                           ).astype(jnp.float32)
        return jax.lax.stop_gradient(column_norm(w))

    def dora_output(self, module, site, x, y, kernel, bias, added, train: bool):
        a = added[site + ".lora_A"].astype(x.dtype)
        b = added[site + ".lora_B"].astype(x.dtype)
        mag = added[site + ".lora_magnitude"]
        scale = (mag.astype(jnp.float32) / self.weight_norm(site, kernel, added)).astype(x.dtype)
        s = jnp.asarray(self.scaling, x.dtype)
        if train and self.config.dropout > 0:
            xd = core.input_dropout(module, x, self.config.dropout, train)
            return y + (scale - 1) * (xd @ kernel.astype(x.dtype)) + scale * ((xd @ a) @ b) * s
        base_out = y if bias is None else y - bias.astype(y.dtype)
        out = scale * (base_out + ((x @ a) @ b) * s)
        return out if bias is None else out + bias.astype(y.dtype)

    # -- merge ----------------------------------------------------------------------------
    def merge(self, base, added, state):
        out = dict(base)
        self._norm_cache = {}
        for site in self.targets:
            k = site + ".kernel"
            w = base[k].astype(jnp.float32) + self.delta_weight(site, added).astype(jnp.float32)
            norm = column_norm(w)
            self._norm_cache[site] = norm
            out[k] = (w * (added[site + ".lora_magnitude"].astype(jnp.float32) / norm)[None, :]
                      ).astype(base[k].dtype)
        return out

    def unmerge(self, merged, added, state):
        cache = getattr(self, "_norm_cache", None)
        if not cache or any(site not in cache for site in self.targets):
            raise ValueError("dora.unmerge needs the weight norms recorded by a preceding "
                             "merge of this adapter (the merged kernel does not determine them)")
        out = dict(merged)
        for site in self.targets:
            k = site + ".kernel"
            mag = added[site + ".lora_magnitude"].astype(jnp.float32)
            w = merged[k].astype(jnp.float32) * (cache[site] / mag)[None, :]
            out[k] = (w - self.delta_weight(site, added).astype(jnp.float32)).astype(merged[k].dtype)
        return out

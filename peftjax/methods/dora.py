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

computed in float32 as LoRA's single GEMM ``x (W0 + s·A B)`` (``lora.low_rank_linear``), whose
``W0 + s·A B`` is the matrix the norm is taken of.

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


@dataclasses.dataclass(frozen=True)
class DoRAConfig(lora.LoRAConfig):
    pass


def column_norm(kernel: jax.Array) -> jax.Array:
    """||W||_c per output unit of a flax (in, out) kernel: shape (out,)."""
    return jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=0))


@core.register("dora")
class DoRA(lora.LoRA):
    """LoRA plus a trainable per-output-unit magnitude; the direction is re-normalised.

    Written on LoRA's variant surface: ``init_site`` adds the magnitude, ``forward`` and
    ``merge_kernel``/``unmerge_kernel`` re-normalise; scaling, targets, inits and factors are
    LoRA's.
    """

    Config = DoRAConfig
    additive = False   # W' = m·(W0 + ΔW)/||W0 + ΔW||_c is not W0 plus a low-rank term
    peft_lora_flags = {"use_dora": True}
    peft_lora_extra = {"lora_magnitude_vector": "lora_magnitude"}

    def init_site(self, rng, site, kernel):
        params = super().init_site(rng, site, kernel)
        # W0 (before any PiSSA residual, which adds back to W0): m0 = ||W0||_c
        params["lora_magnitude"] = column_norm(kernel).astype(kernel.dtype)
        return params

    def weight_norm(self, site: str, kernel, params: dict) -> jax.Array:
        """n = ||W0 + s·A B||_c, detached (a constant for the gradient)."""
        delta = self.delta_weight(site, jax.lax.stop_gradient(params), {})
        return jax.lax.stop_gradient(column_norm(kernel.astype(jnp.float32) + delta))

    def forward(self, call: lora.LinearCall, params: dict, context) -> jax.Array:
        x, y, kernel, bias = call.x, call.y, call.kernel, call.bias
        a, b = self.factors(params, x.dtype, context)   # b carries the scaling s
        mag = params["lora_magnitude"]
        scale = (mag.astype(jnp.float32) / self.weight_norm(call.site, kernel, params)).astype(x.dtype)
        if call.train and self.config.dropout > 0:
            xd = core.input_dropout(call.module, x, self.config.dropout, call.train)
            return y + (scale - 1) * (xd @ kernel.astype(x.dtype)) + scale * ((xd @ a) @ b)
        if self.merged_forward(x, kernel, call.train):
            # x W0 + x A B as LoRA's one GEMM x (W0 + A B) (``lora.low_rank_linear``; its VJP keeps
            # the factored gradients); the norm above reads the same W0 + A B.
            out = scale * lora.low_rank_linear(x, kernel, a, b)
            return out if bias is None else out + bias.astype(out.dtype)
        base_out = y if bias is None else y - bias.astype(y.dtype)
        out = scale * (base_out + (x @ a) @ b)
        return out if bias is None else out + bias.astype(y.dtype)

    # -- merge ----------------------------------------------------------------------------
    def merge_kernel(self, site, kernel, params, state):
        w = kernel.astype(jnp.float32) + self.delta_weight(site, params, state)
        norm = column_norm(w)
        self._norm_cache = {**getattr(self, "_norm_cache", {}), site: norm}
        return (w * (params["lora_magnitude"].astype(jnp.float32) / norm)[None, :]).astype(kernel.dtype)

    def merge(self, base, added, state):
        self._norm_cache = {}
        return super().merge(base, added, state)

    def unmerge_kernel(self, site, merged, params, state):
        cache = getattr(self, "_norm_cache", None)
        if not cache or site not in cache:
            raise ValueError("dora.unmerge needs the weight norms recorded by a preceding "
                             "merge of this adapter (the merged kernel does not determine them)")
        mag = params["lora_magnitude"].astype(jnp.float32)
        w = merged.astype(jnp.float32) * (cache[site] / mag)[None, :]
        return (w - self.delta_weight(site, params, state)).astype(merged.dtype)

"""LoRA (Hu et al., ICLR 2022), with rsLoRA scaling (Kalajdzievski 2023).

For each targeted linear layer with frozen kernel W0 (flax layout, (in, out))::

    h = x W0 + s · dropout(x) A B,      A: (in, r), B: (r, out)
    s = alpha / r        (LoRA, Eq. 3 and §4.1)
    s = alpha / sqrt(r)  (rsLoRA, ``use_rslora=True``)

Initialisation follows HF PEFT (``tuners/lora/layer.py``), the reference code's default:
A ~ kaiming-uniform(a=√5) over fan-in, i.e. U(-1/√in, 1/√in); B = 0, so the adapted model
starts equal to the base. ``init="gaussian"``: A ~ N(0, (1/r)²) (PEFT's gaussian init, std 1/r).
PEFT stores A as (r, in) and B as (out, r) (torch layout); ``peftjax.interop`` transposes.

``init="pissa"`` (PiSSA, Meng et al. 2024; PEFT ``init_lora_weights="pissa"``, ``pissa_init`` in
``tuners/lora/layer.py``): with the SVD of the base weight, the adapter starts on its principal
components and the frozen kernel becomes the residual. PEFT, on the torch weight
W (out, in) = U S Vh: A = diag(sqrt(S_r / s)) Vh_r (r, in), B = U_r diag(sqrt(S_r / s)) (out, r),
W_res = W - s·B A. Here the flax kernel K = Wᵀ (in, out) is decomposed directly, K = U' S V'ᵀ
(U' = Vhᵀ, V' = U), so A = U'_r diag(sqrt(S_r / s)) (in, r) and B = diag(sqrt(S_r / s)) V'ᵀ_r
(r, out) — the transposes of PEFT's — and the residual kernel K - s·A B (``transform_base``).
The adapted model therefore starts equal to the base (to float tolerance). The SVD runs in
float32 (PEFT does the same) and the results are cast back to the kernel's dtype.

Merging folds the update in, W = W0 + s·A B, so inference costs exactly the base model's.

Only A and B are trainable: the frozen kernels receive no weight gradient (the backward pass
computes activation gradients through them, nothing else), which is where LoRA's ~1/3 saving of
training compute comes from.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.methods import core
from peftjax.models import hooks as hooks_lib

# PEFT's default target modules per family (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING):
# the query/value projections (LoRA §7.1) of BERT/RoBERTa (query, value) and Llama (q_proj,
# v_proj); GPT-2 and BLOOM fuse q/k/v into one layer (c_attn, query_key_value), which PEFT targets;
# T5/mT5 name them q and v (self- and cross-attention alike, as PEFT's ["q", "v"]).
DEFAULT_TARGETS = r"\.(query|value|q_proj|v_proj|c_attn|query_key_value|q|v)$"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    init: str = "default"  # 'default' (kaiming-uniform A, zero B) | 'gaussian' | 'pissa'


INITS = ("default", "gaussian", "pissa")


class LoRAHooks(hooks_lib.Hooks):
    """Adds ``s · dropout(x) A B`` at the targeted linear sites."""

    def __init__(self, method: "LoRA", added: core.Flat, train: bool):
        self.method, self.added, self.train = method, added, train

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        if site not in self.method.targets:
            return y
        if self.method.merged_forward(x, kernel, self.train):
            # y = x W0 + b is then unused and XLA drops it.
            y = low_rank_linear(x, kernel, *self.method.factors(site, self.added, x.dtype))
            return y if bias is None else y + bias
        return y + self.method.delta(module, site, x, self.added, self.train)


@jax.custom_vjp
def low_rank_linear(x: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``x W0 + (x A) B`` computed as ``x (W0 + A B)``: one GEMM instead of two plus an add.

    Why: the rank-r product (x A) B writes a full (tokens, out) array from an r-wide contraction,
    which runs far below matmul speed on CPU; folding A B (in × r × out, negligible) into the
    kernel leaves the forward the base model's single GEMM. The VJP keeps the factored
    gradients, dx = dy (W0 + A B)ᵀ (again one GEMM), dA = xᵀ (dy Bᵀ), dB = (x A)ᵀ dy, so a
    frozen W0 costs no weight gradient (its cotangent xᵀ dy is unused and XLA removes it).
    Equal to the factored form up to float rounding; used in float32 without LoRA dropout
    (``LoRA.merged_forward``).
    """
    return jnp.dot(x, kernel + a @ b)


def _low_rank_linear_fwd(x, kernel, a, b):
    merged = kernel + a @ b
    return jnp.dot(x, merged), (x, merged, a, b)


def _low_rank_linear_bwd(res, dy):
    x, merged, a, b = res
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = jnp.dot(dy, merged.T)
    dxa = dy2 @ b.T
    return dx, x2.T @ dy2, x2.T @ dxa, (x2 @ a).T @ dy2


low_rank_linear.defvjp(_low_rank_linear_fwd, _low_rank_linear_bwd)


@core.register("lora")
class LoRA(core.Method):
    """Low-rank adaptation of the targeted linear layers."""

    Config = LoRAConfig
    family = "low_rank"
    mergeable = True
    inits = INITS

    def validate(self) -> None:
        c = self.config
        name = self.name
        core.check_range(name, "rank", c.rank, "an integer >= 1", isinstance(c.rank, int) and c.rank >= 1)
        core.check_range(name, "dropout", c.dropout, "0 <= dropout < 1", 0 <= c.dropout < 1)
        core.check_range(name, "init", c.init, f"one of {list(self.inits)}", c.init in self.inits)
        self.targets = self.match_low_rank_targets(c.targets, "rank", c.rank)

    @property
    def scaling(self) -> float:
        c = self.config
        return c.alpha / math.sqrt(c.rank) if c.use_rslora else c.alpha / c.rank

    # -- params ---------------------------------------------------------------------------
    def init_pair(self, rng, site: str, dtype) -> tuple[jax.Array, jax.Array]:
        info = self.sites.linear[site]
        fan_in, fan_out, r = info["in_features"], info["out_features"], self.config.rank
        if self.config.init == "gaussian":
            a = jax.random.normal(rng, (fan_in, r), dtype) / r
        else:
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5): gain·√(3/fan_in) = 1/√fan_in
            a = jax.random.uniform(rng, (fan_in, r), dtype, -bound, bound)
        return a, jnp.zeros((r, fan_out), dtype)

    def pissa_pair(self, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
        """PiSSA's principal-component init of (A, B) from a flax (in, out) kernel."""
        r = self.config.rank
        u, s, vt = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[:r] / self.scaling)
        return ((u[:, :r] * root[None, :]).astype(kernel.dtype),
                (root[:, None] * vt[:r]).astype(kernel.dtype))

    def init(self, rng, base, ctx):
        added = {}
        for i, site in enumerate(self.targets):
            dtype = base[site + ".kernel"].dtype
            if self.config.init == "pissa":
                a, b = self.pissa_pair(base[site + ".kernel"])
            else:
                a, b = self.init_pair(jax.random.fold_in(rng, i), site, dtype)
            added[site + ".lora_A"], added[site + ".lora_B"] = a, b
        return added

    def transform_base(self, base, added):
        """PiSSA: each targeted kernel becomes the residual W0 - s·A B (other inits: unchanged)."""
        if self.config.init != "pissa":
            return base
        out = dict(base)
        for site in self.targets:
            k = site + ".kernel"
            delta = self.scaling * (added[site + ".lora_A"] @ added[site + ".lora_B"])
            out[k] = base[k] - delta.astype(base[k].dtype)
        return out

    # -- forward --------------------------------------------------------------------------
    def hooks(self, added, state, *, train, rng):
        return LoRAHooks(self, added, train)

    def merged_forward(self, x: jax.Array, kernel: jax.Array, train: bool) -> bool:
        """Whether a targeted layer runs as ``low_rank_linear``: plain LoRA's ``delta`` (not a
        subclass's), no active dropout on the adapter's input (it would differ between the two
        terms), and float32 (in bf16, W0 + A B would round the small update into W0)."""
        return (type(self).delta is LoRA.delta and (not train or self.config.dropout <= 0)
                and x.dtype == jnp.float32 and kernel.dtype == jnp.float32)

    def factors(self, site: str, added, dtype) -> tuple[jax.Array, jax.Array]:
        """``(A, s·B)`` of a site in ``dtype``: the scaling multiplies the small (r, out) matrix,
        not the (batch, seq, out) output."""
        a = added[site + ".lora_A"].astype(dtype)
        return a, added[site + ".lora_B"].astype(dtype) * jnp.asarray(self.scaling, dtype)

    def delta(self, module: nn.Module, site: str, x, added, train: bool):
        a, b = self.factors(site, added, x.dtype)
        x = core.input_dropout(module, x, self.config.dropout, train)
        return (x @ a) @ b

    # -- merge ----------------------------------------------------------------------------
    def delta_weight(self, site: str, added) -> jax.Array:
        """ΔW = s·A B, in the kernel's (in, out) layout."""
        return self.scaling * (added[site + ".lora_A"] @ added[site + ".lora_B"])

    def merge(self, base, added, state):
        out = dict(base)
        for site in self.targets:
            k = site + ".kernel"
            out[k] = (base[k] + self.delta_weight(site, added).astype(base[k].dtype))
        return out

    def unmerge(self, merged, added, state):
        out = dict(merged)
        for site in self.targets:
            k = site + ".kernel"
            out[k] = (merged[k] - self.delta_weight(site, added).astype(merged[k].dtype))
        return out

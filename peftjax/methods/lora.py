"""LoRA (Hu et al., ICLR 2022), with rsLoRA scaling (Kalajdzievski 2023) and PiSSA init (Meng et
al. 2024), and the variant surface every low-rank variant builds on (DoRA, DyLoRA, AdaLoRA).

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
(r, out) — the transposes of PEFT's — and the residual kernel K - s·A B (``base_kernel``). The
adapted model therefore starts equal to the base (to float tolerance). The SVD runs in float32
(PEFT does the same) and the results are cast back to the kernel's dtype.

Merging folds the update in, W = W0 + s·A B, so inference costs exactly the base model's.

Only A and B are trainable: the frozen kernels receive no weight gradient (the backward pass
computes activation gradients through them, nothing else), which is where LoRA's ~1/3 saving of
training compute comes from.

The variant surface (``docs/adding_a_low_rank_variant.md``)
----------------------------------------------------------
A low-rank variant subclasses ``LoRA`` and overrides only what differs; every method of the
surface works on *one site's* params, a dict keyed by local names (``{"lora_A": ..., "lora_B":
...}``), with the method state and a per-call context at hand:

==================================================  ==========================================
``scaling``                                         s (rsLoRA: alpha/√r; AdaLoRA: alpha/r₀)
``init_site(rng, site, kernel) -> params``          a site's params (PiSSA: SVD; DoRA adds m)
``base_kernel(site, kernel, params) -> kernel``     the frozen kernel trained against (PiSSA)
``forward_context(state, *, train, rng)``           values shared by all layers in one call
                                                    (DyLoRA: the rank b drawn for the step)
``factors(params, dtype, context) -> (A, B)``       ΔW = A B, scaling folded into B
``forward(call, params, context) -> y``             the adapted output (DoRA re-normalises)
``delta_weight(site, params, state)``               ΔW for merging (from ``factors``)
``merge_kernel`` / ``unmerge_kernel``               W0 ± ΔW (DoRA: m·(W0+ΔW)/‖W0+ΔW‖_c)
``additive``                                        whether the update is W0 + ΔW (adapter sets)
==================================================  ==========================================

Everything else — validation of targets and rank, the per-site loop, hooks, merge of the whole
tree, saving, accounting, export — is LoRA's and is inherited.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from peftjax.methods import core
from peftjax.models import hooks as hooks_lib
from peftjax.models import moe

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
    use_rslora: bool = False  # s = alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
    init: str = "default"     # default (kaiming-uniform A, B=0) | gaussian | pissa (SVD of W0, residual base)
    # PEFT's target_parameters: params adapted directly, by name suffix ("mlp.experts.gate_up_proj",
    # a MoE's stacked experts: per-expert A, B; "mlp.gate.weight": a Linear's weight, the router).
    # A sequence, or one comma-separated string (the command line's form); "" = none.
    target_parameters: str | tuple[str, ...] = ""


INITS = ("default", "gaussian", "pissa")
BASE_REWRITING_INITS = ("pissa",)


class LinearCall(NamedTuple):
    """One call of a targeted linear layer, as a variant's ``forward`` sees it."""

    module: Any            # the calling flax module (its ``make_rng("dropout")`` draws dropout)
    site: str              # dotted module path, the key prefix of the site's params
    x: jax.Array           # the layer's input
    y: jax.Array           # x W0 + bias, as the base layer computed it
    kernel: jax.Array      # W0 (in, out) — after ``base_kernel`` (PiSSA: the residual)
    bias: jax.Array | None
    train: bool


def site_params(added: core.Flat, targets) -> dict[str, dict[str, jax.Array]]:
    """``{site: {local name: array}}`` of the targeted sites' params (``"<site>.<name>"`` keys)."""
    grouped: dict[str, dict[str, jax.Array]] = {s: {} for s in targets}
    for key, value in added.items():
        site, _, name = key.rpartition(".")
        if site in grouped:
            grouped[site][name] = value
    return grouped


class LoRAHooks(hooks_lib.Hooks):
    """Runs the variant's ``forward`` at the targeted linear sites, and LoRA's per-expert update
    at the targeted stacked expert params."""

    def __init__(self, method: "LoRA", added: core.Flat, context: Any, train: bool):
        self.method, self.train, self.context = method, train, context
        self.params = site_params(added, method.targets)
        self.grouped = site_params(added, method.grouped_targets)

    def grouped_linear(self, module, name, x, y, kernel, group_sizes):
        site = f"{hooks_lib.site(module)}.{name}"
        if site not in self.grouped:
            return y
        # y + s · (x A_e) B_e for each row's expert e: two grouped GEMMs of width r.
        a, b = self.method.factors(self.grouped[site], x.dtype, self.context)
        return y + moe.grouped_matmul(moe.grouped_matmul(x, a, group_sizes), b, group_sizes)

    def linear(self, module, x, y, kernel, bias):
        site = hooks_lib.site(module)
        if site not in self.params:
            return y
        call = LinearCall(module, site, x, y, kernel, bias, self.train)
        return self.method.forward(call, self.params[site], self.context)


@jax.custom_vjp
def low_rank_linear(x: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``x W0 + (x A) B`` computed as ``x (W0 + A B)``: one GEMM instead of two plus an add.

    Why: the rank-r product (x A) B writes a full (tokens, out) array from an r-wide contraction,
    which runs far below matmul speed on CPU; folding A B (in × r × out, negligible) into the
    kernel leaves the forward the base model's single GEMM. The VJP keeps the factored
    gradients, dx = dy (W0 + A B)ᵀ (again one GEMM), dA = xᵀ (dy Bᵀ), dB = (x A)ᵀ dy, so a
    frozen W0 costs no weight gradient (its cotangent xᵀ dy is unused and XLA removes it).
    Equal to the factored form up to float rounding; used in float32 without adapter dropout
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
    additive = True   # the update is W0 + ΔW (DoRA re-normalises: False)
    # Hugging Face PEFT (``peftjax.interop``) reads a variant from these, not from its name:
    # ``peft_lora_flags``, the LoraConfig fields that select it (DoRA: use_dora=True), or None
    # when PEFT has no LoraConfig form of it (DyLoRA's per-step rank; AdaLoRA's own format);
    # ``peft_lora_extra``, its tensors besides lora_A / lora_B ({PEFT key suffix: local name}).
    # ``inits`` also name PEFT's ``init_lora_weights`` strings (gaussian, pissa, olora): a PEFT
    # file saved with a base-rewriting init is read as the variant whose ``inits`` hold it.
    peft_lora_flags: ClassVar[dict[str, Any] | None] = {}
    peft_lora_extra: ClassVar[dict[str, str]] = {}
    # target_parameters (``validate``): stacked expert sites, and the linear sites named by weight
    grouped_targets: tuple | list = ()
    parameter_targets: tuple | list = ()

    def validate(self) -> None:
        c = self.config
        name = self.name
        core.check_range(name, "rank", c.rank, "an integer >= 1", isinstance(c.rank, int) and c.rank >= 1)
        core.check_range(name, "dropout", c.dropout, "0 <= dropout < 1", 0 <= c.dropout < 1)
        core.check_range(name, "init", c.init, f"one of {list(self.inits)}", c.init in self.inits)
        parameters = getattr(c, "target_parameters", ()) or ()
        # With target_parameters alone (PEFT: target_modules=[]), no module is targeted.
        no_modules = parameters and (c.targets in ((), [], "") or c.targets is None)
        self.targets = [] if no_modules else self.match_low_rank_targets(c.targets, "rank", c.rank)
        self.grouped_targets, self.parameter_targets = self.match_target_parameters(parameters)
        for site in self.parameter_targets:   # a Linear's weight by name: LoRA on that layer
            if site not in self.targets:
                self.targets.append(site)

    def match_target_parameters(self, patterns) -> tuple[list[str], list[str]]:
        """PEFT's ``target_parameters``: ``(stacked expert sites, linear sites)`` named by param.

        A name matches a param whose full name equals it or ends with ``.name`` (PEFT's suffix
        rule): a MoE's stacked experts (``mlp.experts.gate_up_proj``, adapted per expert) or a
        Linear's ``weight`` (``mlp.gate.weight``, the router: the same update as a module
        target). As in PEFT's ``ParamWrapper``, only plain LoRA (rsLoRA included) applies, with
        no dropout and the default or gaussian init.
        """
        if isinstance(patterns, str):
            patterns = tuple(p.strip() for p in patterns.split(",") if p.strip())
        if not patterns:
            return [], []
        c = self.config
        if type(self).forward is not LoRA.forward or type(self).factors is not LoRA.factors \
                or self.name not in ("lora",):
            raise ValueError(f"{self.name}: target_parameters is plain LoRA's (PEFT's ParamWrapper "
                             "refuses LoRA variants); use method=lora")
        if c.dropout > 0 or c.init not in ("default", "gaussian"):
            raise ValueError(f"{self.name}: target_parameters needs dropout=0 and init default or "
                             f"gaussian (PEFT's ParamWrapper), got dropout={c.dropout}, init={c.init!r}")
        grouped = {s: v for s, v in self.sites.grouped.items() if not self.sites.is_head(s)}
        linear = {s + ".weight": s for s in self.sites.backbone_linear}
        available = list(grouped) + list(linear)
        chosen_grouped, chosen_linear = [], []
        for pattern in patterns:
            rx = re.compile(r"(?:^|\.)" + re.escape(pattern) + "$")
            hits = [p for p in available if rx.search(p)]
            if not hits:
                raise ValueError(f"{self.name}: target_parameters entry {pattern!r} matches no param; "
                                 "available (stacked experts, then linear weights):\n  "
                                 + core.summarize_paths(available))
            for hit in hits:
                if hit in grouped and hit not in chosen_grouped:
                    info = grouped[hit]
                    limit = min(info["in_features"], info["out_features"])
                    core.check_range(self.name, "rank", c.rank, f"1..{limit} (target {hit} is "
                                     f"{info['experts']}x{info['in_features']}x{info['out_features']})",
                                     c.rank <= limit)
                    chosen_grouped.append(hit)
                elif hit in linear and linear[hit] not in chosen_linear:
                    chosen_linear.append(linear[hit])
        order = {s: i for i, s in enumerate(available)}   # the model's order, not the patterns'
        return (sorted(chosen_grouped, key=order.__getitem__),
                sorted(chosen_linear, key=lambda s: order[s + ".weight"]))

    # == the variant surface ==================================================================
    @property
    def scaling(self) -> float:
        """s in h = x W0 + s · x A B."""
        c = self.config
        return c.alpha / math.sqrt(c.rank) if c.use_rslora else c.alpha / c.rank

    def init_site(self, rng: jax.Array, site: str, kernel: jax.Array) -> dict[str, jax.Array]:
        """One site's params from the pretrained kernel W0 (in, out)."""
        if self.config.init == "pissa":
            return dict(zip(("lora_A", "lora_B"), self.pissa_pair(kernel)))
        fan_in, fan_out = kernel.shape
        r = self.config.rank
        return {"lora_A": self.draw_a(rng, (fan_in, r), kernel.dtype),
                "lora_B": jnp.zeros((r, fan_out), kernel.dtype)}

    def draw_a(self, rng: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
        """A at init, ``shape`` ``(..., in, r)``: N(0, 1/r²) (gaussian) or kaiming-uniform over
        ``in`` (a=√5: gain·√(3/fan_in) = 1/√fan_in), PEFT's draws."""
        r, fan_in = shape[-1], shape[-2]
        if self.config.init == "gaussian":
            return jax.random.normal(rng, shape, dtype) / r
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(rng, shape, dtype, -bound, bound)

    def pissa_pair(self, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
        """PiSSA's principal-component init of (A, B) from a flax (in, out) kernel."""
        r = self.config.rank
        u, s, vt = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[:r] / self.scaling)
        return ((u[:, :r] * root[None, :]).astype(kernel.dtype),
                (root[:, None] * vt[:r]).astype(kernel.dtype))

    def base_kernel(self, site: str, kernel: jax.Array, params: dict) -> jax.Array:
        """The frozen kernel the site trains against: PiSSA's residual W0 - s·A₀B₀, else W0."""
        if self.config.init != "pissa":
            return kernel
        return kernel - self.delta_weight(site, params, {}).astype(kernel.dtype)

    def forward_context(self, state: core.Flat, *, train: bool, rng: jax.Array | None) -> Any:
        """Values every layer of one forward pass shares (DyLoRA: the rank drawn for the step)."""
        return None

    def factors(self, params: dict, dtype, context: Any = None) -> tuple[jax.Array, jax.Array]:
        """``(A, s·B)`` in ``dtype``, so ΔW = A B': the scaling multiplies the small (r, out)
        matrix, not the (batch, seq, out) output."""
        a = params["lora_A"].astype(dtype)
        return a, params["lora_B"].astype(dtype) * jnp.asarray(self.scaling, dtype)

    def forward(self, call: LinearCall, params: dict, context: Any) -> jax.Array:
        """``y + dropout(x) A B'`` with (A, B') = ``factors``; without active dropout in float32
        as one GEMM, ``x (W0 + A B') + bias`` (``low_rank_linear``)."""
        a, b = self.factors(params, call.x.dtype, context)
        if self.merged_forward(call.x, call.kernel, call.train):
            # y = x W0 + bias is then unused and XLA drops it.
            y = low_rank_linear(call.x, call.kernel, a, b)
            return y if call.bias is None else y + call.bias
        x = core.input_dropout(call.module, call.x, self.config.dropout, call.train)
        return call.y + (x @ a) @ b

    def merged_forward(self, x: jax.Array, kernel: jax.Array, train: bool) -> bool:
        """Whether ``forward`` runs as ``low_rank_linear``: no active dropout on the adapter's
        input (it would differ between the two terms), and float32 (in bf16, W0 + A B would
        round the small update into W0)."""
        return ((not train or self.config.dropout <= 0)
                and x.dtype == jnp.float32 and kernel.dtype == jnp.float32)

    def delta_weight(self, site: str, params: dict, state: core.Flat) -> jax.Array:
        """ΔW = A B' (float32, the kernel's (in, out) layout) as evaluation uses it."""
        a, b = self.factors(params, jnp.float32, self.forward_context(state, train=False, rng=None))
        return a @ b

    def merge_kernel(self, site: str, kernel: jax.Array, params: dict, state: core.Flat) -> jax.Array:
        return kernel + self.delta_weight(site, params, state).astype(kernel.dtype)

    def unmerge_kernel(self, site: str, merged: jax.Array, params: dict, state: core.Flat) -> jax.Array:
        return merged - self.delta_weight(site, params, state).astype(merged.dtype)

    # == the method protocol, written once for every variant ==================================
    def init(self, rng, base, ctx):
        added = {}
        for i, site in enumerate(self.targets):
            params = self.init_site(jax.random.fold_in(rng, i), site, base[site + ".kernel"])
            added.update({f"{site}.{name}": value for name, value in params.items()})
        for i, site in enumerate(self.grouped_targets, start=len(self.targets)):
            params = self.init_grouped_site(jax.random.fold_in(rng, i), base[site])
            added.update({f"{site}.{name}": value for name, value in params.items()})
        return added

    def init_grouped_site(self, rng: jax.Array, stacked: jax.Array) -> dict[str, jax.Array]:
        """Per-expert factors of a stacked ``(E, in, out)`` param: A ``(E, in, r)`` drawn as a
        single Linear's (PEFT's ParamWrapper: one ``(r·E, in)`` lora_A, kaiming-uniform over
        ``in``), B ``(E, r, out)`` zero."""
        experts, fan_in, fan_out = stacked.shape
        r = self.config.rank
        return {"lora_A": self.draw_a(rng, (experts, fan_in, r), stacked.dtype),
                "lora_B": jnp.zeros((experts, r, fan_out), stacked.dtype)}

    def grouped_delta(self, params: dict) -> jax.Array:
        """ΔW_e = s · A_e B_e for every expert, ``(E, in, out)`` float32."""
        a, b = self.factors(params, jnp.float32)
        return jnp.einsum("eir,ero->eio", a, b)

    @property
    def rewrites_base(self) -> bool:
        return self.config.init in BASE_REWRITING_INITS

    def transform_base(self, base, added):
        if not self.rewrites_base:
            return base
        out = dict(base)
        for site, params in site_params(added, self.targets).items():
            out[site + ".kernel"] = self.base_kernel(site, base[site + ".kernel"], params)
        return out

    def hooks(self, added, state, *, train, rng):
        return LoRAHooks(self, added, self.forward_context(state, train=train, rng=rng), train)

    def merge(self, base, added, state):
        out = dict(base)
        for site, params in site_params(added, self.targets).items():
            out[site + ".kernel"] = self.merge_kernel(site, base[site + ".kernel"], params, state)
        for site, params in site_params(added, self.grouped_targets).items():
            out[site] = base[site] + self.grouped_delta(params).astype(base[site].dtype)
        return out

    def unmerge(self, merged, added, state):
        out = dict(merged)
        for site, params in site_params(added, self.targets).items():
            out[site + ".kernel"] = self.unmerge_kernel(site, merged[site + ".kernel"], params, state)
        for site, params in site_params(added, self.grouped_targets).items():
            out[site] = merged[site] - self.grouped_delta(params).astype(merged[site].dtype)
        return out

    def low_rank_factors(self, added, state):
        # Per-expert factors are not one (A, B) per layer: adapter sets refuse them.
        if not self.additive or self.rewrites_base or self.grouped_targets:
            return None
        context = self.forward_context(state, train=False, rng=None)
        return {site: self.factors(params, jnp.float32, context)
                for site, params in site_params(added, self.targets).items()}

"""LoRA-GA (Wang, Yu & Li, NeurIPS 2024, "LoRA-GA: Low-Rank Adaptation with Gradient
Approximation", arXiv:2407.05000): LoRA initialised from the SVD of the full fine-tuning gradient,
so that the adapter's first steps follow full fine-tuning's, the frozen kernel rewritten so that
the model starts equal to the base.

Algorithm 1 of the paper, per targeted kernel W (torch layout, (out, in)):

    G = ∇_W L                          over a few training batches (``fisher.mean_gradient``)
    U, S, Vᵀ = svd(G)                  the 2r leading singular triplets
    A = Vᵀ[:r],  B = U[:, r:2r]        ("ArB2r": A, B from disjoint halves; other ``direction``s
                                        below), then scaled (``scale``)
    W_res = W − s · B A                s = alpha / r (alpha / √r with rsLoRA)

so that W_res + s·B A = W, and A's and B's gradients at the first step are the projections of G
onto the spans that make s·ΔB·A + s·B·ΔA the best rank-2r approximation of one step of full
fine-tuning (the paper's gradient-approximation argument).

The data pass is the protocol's "prepare from data" pass, shared with FishMask's and
Child-tuning_D's Fisher estimates: ``prepare(ctx)`` refuses a run without training data, then
``init(rng, base, ctx)`` reads ``ctx.train_batches`` and ``ctx.loss_fn`` (the task loss of the
full base params, eval mode) and ``fisher.mean_gradient`` averages the gradient of the targeted
kernels over the batches holding the first ``num_examples`` rows, ``batch_size`` rows each
(PEFT's ``estimate_gradients``: the gradient accumulated over the caller's backward passes over
their number; the reference code's defaults, 64 batches of 2, are ``num_examples=128,
batch_size=2``). Without dropout: PEFT runs its caller's ``train_step`` in train mode, so the two
agree when dropout is 0.

Two forms of the init:

* ``form="peft"`` (default): Hugging Face PEFT 0.21.2's ``lora_ga_init``
  (``init_lora_weights="lora_ga"``, ``LoraGAConfig``) — B carries the selected singular values,
  B = U[:, idx_B] diag(S[idx_B]), A = Vᵀ[idx_A]; ``scale="stable"`` multiplies B by
  out^¼/√γ, ``"weight_svd"`` multiplies B by σ₁(W)/S[idx_B][0], ``"gd_scale"`` divides A and B by
  s, ``"unit"`` leaves them; ``direction="random"`` draws one index set of r from the 2r for both.
* ``form="paper"``: the authors' code (github.com/Outsider565/LoRA-GA, ``lora_ga_init``) and the
  paper's Algorithm 1 — no singular values in B, and the scale on *both* factors: ``"stable"``
  multiplies A and B by out^¼/√γ, ``"weight_svd"`` (their ``weightS``) by mean(√(σ_{1..r}(W)/s)),
  ``"gd_scale"`` divides both by s; ``"random"`` draws disjoint index sets for A and B.

Directions (indices into the 2r triplets): ``ArB2r`` A ← [0, r), B ← [r, 2r) (the paper's);
``A2rBr`` A ← [r, 2r), B ← [0, r); ``ArBr`` A ← the odd, B ← the even indices.

The SVD is exact (LAPACK, float32), where PEFT and the reference code call the randomised
``torch.svd_lowrank(G, q=min(4r, min(out, in)), niter=4)``, which approximates the same leading
triplets (and ``svd_lowrank(W)`` for ``weight_svd``). Singular vectors are defined up to sign, so
A's rows and B's columns match PEFT's up to sign; W_res is computed from the factors actually
used, as PEFT does (float32, then the kernel's dtype), so the model starts equal to the base.
In flax layout (kernel K = Wᵀ) the factors are the transposes: A (in, r), B (r, out),
K_res = K − s·A B.

Files: ``rewrites_base`` is true, so peftjax adapter files carry the initial A₀, B₀ to rebuild
the residual on load, and the Hugging Face PEFT export is PEFT's own conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``, which PEFT names for
LoRA-GA): a rank-2r plain LoRA of the original base. A PEFT file saved *without* that conversion
(``init_lora_weights="lora_ga"``) trained against a residual that only its training data can
rebuild — PEFT itself reloads it onto the unmodified base — so its import is refused; this
method's init is therefore named ``"gradient_svd"``, not PEFT's ``"lora_ga"`` (``inits``
doubles as the PEFT names a LoRA variant reads).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from peftjax.methods import core, fisher, lora

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
FORMS = ("peft", "paper")


@dataclasses.dataclass(frozen=True)
class LoRAGAConfig(lora.LoRAConfig):
    init: str = "gradient_svd"   # the one init: A, B from the SVD of the gradient
    direction: str = "ArB2r"     # which singular triplets A and B take (PEFT's LoraGAConfig)
    scale: str = "stable"        # stable | weight_svd | gd_scale | unit (PEFT's LoraGAConfig)
    stable_gamma: float = 16.0   # γ of the stable scale out^¼/√γ (PEFT: 16)
    form: str = "peft"           # peft (PEFT 0.21.2's lora_ga_init) | paper (the authors' code)
    num_examples: int = 128      # training rows in the gradient estimate (reference: 64 × 2)
    batch_size: int = 2          # rows per backward pass of the estimate (reference: 2)
    progress: bool = True


@core.register("lora_ga")
class LoRAGA(lora.LoRA):
    """LoRA whose A, B start from the SVD of the full gradient, trained against W0 − s·A₀B₀."""

    Config = LoRAGAConfig
    inits = ("gradient_svd",)

    def validate(self) -> None:
        super().validate()
        c, name = self.config, self.name
        core.check_range(name, "direction", c.direction, " | ".join(DIRECTIONS), c.direction in DIRECTIONS)
        core.check_range(name, "scale", c.scale, " | ".join(SCALES), c.scale in SCALES)
        core.check_range(name, "form", c.form, " | ".join(FORMS), c.form in FORMS)
        core.check_range(name, "stable_gamma", c.stable_gamma, "a finite number > 0",
                         isinstance(c.stable_gamma, (int, float)) and math.isfinite(c.stable_gamma)
                         and c.stable_gamma > 0)
        for field in ("num_examples", "batch_size"):
            value = getattr(c, field)
            core.check_range(name, field, value, "an integer >= 1",
                             isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        for site in self.targets:  # 2r singular triplets must exist
            info = self.sites.linear[site]
            limit = min(info["in_features"], info["out_features"])
            core.check_range(name, "rank", c.rank,
                             f"1..{limit // 2}: LoRA-GA takes 2·rank singular vectors and target "
                             f"{site} is {info['in_features']}x{info['out_features']}",
                             2 * c.rank <= limit)

    @property
    def rewrites_base(self) -> bool:
        return True

    def prepare(self, ctx: core.InitContext) -> None:
        """Refuses a run without training data before anything is computed."""
        fisher.require_training_data(ctx, self.name, "its gradient estimate", self.config.num_examples)

    def count_added(self, abstract_base: core.Flat) -> int:
        """A (in × r) and B (r × out) per target, from shapes (the init needs data)."""
        r = self.config.rank
        return sum(r * (self.sites.linear[s]["in_features"] + self.sites.linear[s]["out_features"])
                   for s in self.targets)

    def init(self, rng, base, ctx):
        c = self.config
        self.prepare(ctx)
        paths = [site + ".kernel" for site in self.targets]
        grads, _, used = fisher.mean_gradient(
            ctx.loss_fn, base, paths, fisher.rechunk(ctx.train_batches(), c.batch_size),
            c.num_examples, desc="lora_ga gradient", progress=c.progress)
        if used < c.num_examples:
            raise ValueError(f"lora_ga.num_examples={c.num_examples} is larger than the training "
                             f"set ({used} examples)")
        added = {}
        for i, site in enumerate(self.targets):
            a, b = self.gradient_pair(jax.random.fold_in(rng, i), grads[site + ".kernel"],
                                      base[site + ".kernel"])
            added[site + ".lora_A"], added[site + ".lora_B"] = a, b
        return added

    def indices(self, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Indices into the 2r leading triplets that A and B take (``direction``)."""
        r = self.config.rank
        direction = self.config.direction
        if direction == "ArB2r":
            return jnp.arange(r), jnp.arange(r, 2 * r)
        if direction == "A2rBr":
            return jnp.arange(r, 2 * r), jnp.arange(r)
        if direction == "ArBr":
            return jnp.arange(1, 2 * r, 2), jnp.arange(0, 2 * r, 2)
        perm = jax.random.permutation(rng, 2 * r)
        return (perm[:r], perm[:r]) if self.config.form == "peft" else (perm[:r], perm[r:])

    def gradient_pair(self, rng: jax.Array, grad: jax.Array, kernel: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
        """(A (in, r), B (r, out)) in the kernel's dtype from the gradient of the flax kernel
        (in, out); computed in torch layout (G = gradᵀ, (out, in)) as the module docstring."""
        c = self.config
        r, s = c.rank, self.scaling
        out_features = kernel.shape[1]
        u, sv, vh = jnp.linalg.svd(grad.astype(jnp.float32).T, full_matrices=False)
        idx_a, idx_b = self.indices(rng)
        a_t, b_t = vh[idx_a], u[:, idx_b]                       # (r, in), (out, r)
        stable = out_features ** 0.25 / math.sqrt(c.stable_gamma)
        if c.form == "peft":
            s_b = sv[idx_b]
            b_t = b_t * s_b[None, :]
            if c.scale == "stable":
                b_t = b_t * stable
            elif c.scale == "weight_svd":
                top = jnp.linalg.svd(kernel.astype(jnp.float32), compute_uv=False)[0]
                b_t = b_t * jnp.where(s_b[0] > 0, top / jnp.where(s_b[0] > 0, s_b[0], 1.0), 1.0)
            elif c.scale == "gd_scale":
                a_t, b_t = a_t / s, b_t / s
        else:
            factor = 1.0
            if c.scale == "stable":
                factor = stable
            elif c.scale == "weight_svd":
                sw = jnp.linalg.svd(kernel.astype(jnp.float32), compute_uv=False)[:r]
                factor = jnp.mean(jnp.sqrt(sw / s))
            elif c.scale == "gd_scale":
                factor = 1.0 / s
            a_t, b_t = a_t * factor, b_t * factor
        return a_t.T.astype(kernel.dtype), b_t.T.astype(kernel.dtype)

    def base_kernel(self, site, kernel, params):
        """The residual K − s·A₀B₀ (float32 from the factors as stored, cast back, as PEFT)."""
        delta = self.delta_weight(site, params, {})
        return (kernel.astype(jnp.float32) - delta).astype(kernel.dtype)

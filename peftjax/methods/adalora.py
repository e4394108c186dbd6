"""AdaLoRA: adaptive budget allocation over SVD-form low-rank updates (Zhang et al., ICLR 2023).

Each targeted linear layer gets ΔW = P Λ Q (§3.1, Eq. 3) with Λ = diag(λ_1..λ_r) holding the
"triplets" (P_{·i}, λ_i, Q_{i·}). Layout here (flax kernels are (in, out), ΔW in the same layout)::

    lora_A  (in, r)   = Q transposed       (PEFT: lora_A (r, in))
    lora_E  (r,)      = Λ                  (PEFT: lora_E (r, 1))
    lora_B  (r, out)  = P transposed       (PEFT: lora_B (out, r))
    h = x W0 + s · ((dropout(x) A) ⊙ E) B,    s = alpha / (ranknum + 1e-5)

Scaling follows the reference code (PEFT ``AdaLoraLayer``, QingruZhang/AdaLoRA ``loralib``):
``scaling = lora_alpha`` and the output is divided by ``ranknum``, a constant equal to the
layer's initial rank ``init_r`` during training (masking zeroes λ's, it does not change ranknum).
Init (PEFT): E = 0, A and B ~ N(0, 0.02²), so the adapted model starts equal to the base.

Importance (§3.2, Eqs. 8-10; PEFT ``RankAllocator.update_ipt``), for every entry w of A, E, B
after the optimizer step, with the step's gradient::

    I = |w · ∂L/∂w|,  Ī ← β1 Ī + (1-β1) I,  Ū ← β2 Ū + (1-β2) |I - Ī|,  s(w) = Ī · Ū

The gradient is the one the optimizer used: after the run's global-norm clipping
(``InitContext.clip_norm``, train.clip_norm), ∂L/∂w · min(1, c/‖g‖) with ‖g‖ over the whole
trainable tree. PEFT's ``update_and_allocate`` reads ``p.grad`` after ``optimizer.step()``, and
a training loop that clips (transformers' Trainer, the AdaLoRA reference code) has rescaled it
in place by then; the raw gradient would weight each step's importance by 1/min(1, c/‖g‖) more
than PEFT does (found by the training-parity run, ``peftjax.interop.train_parity``). With
gradient accumulation the importance reads each micro-step's gradient, clipped by its own norm.

(Ī updated first, Ū uses the new Ī; β1 = β2 = 0.85). A triplet's score (Eq. 11) is
s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji).

Budget (Eq. 12; PEFT ``budget_schedule``), in triplets summed over all targeted layers, with
b0 = init_r · n_layers, b_T = target_r · n_layers, T = total_step::

    t <= t_init:                  b0, no masking
    t_init < t <= T - t_final:    int(b_T + (b0 - b_T) (1 - (t - t_init)/(T - t_final - t_init))³),
                                  mask when t % deltaT == 0
    t >  T - t_final:             b_T, the rank pattern fixed at t = T - t_final is re-applied

Masking (PEFT ``mask_to_budget``) is global: the (b0 - b)-th smallest triplet score is the
threshold and every λ with score <= threshold is set to zero (as the reference does; optimizer
moments are left alone, so a masked λ may regrow before the next masking step). At
t = T - t_final the mask is forced at b_T, stored as the final rank pattern, and the importance
EMAs are reset; afterwards the pattern is applied every step. The importance is updated only
while t < T - t_final. ``t`` is the train step's counter (micro-steps; equal to optimizer steps
without gradient accumulation), starting at 0 as in PEFT's ``update_and_allocate(global_step)``.

The schedule is precomputed in Python as tables over t = 0..T (exact integer budgets, as PEFT's
``int(...)``), so ``update_state`` is jittable: the dynamic budget becomes a threshold via a sort.

Orthogonality regulariser (Eq. 4; PEFT ``AdaLoraModel.forward``)::

    R = mean over all A's and B's of ||Aᵀ A - I||_F, ||B Bᵀ - I||_F   (Frobenius, not squared)

added to the loss with weight ``orth_reg_weight`` (PEFT default 0.5; official GLUE scripts 0.1).

Defaults are PEFT's ``AdaLoraConfig``: init_r 12, target_r 8, lora_alpha 8, tinit 0, tfinal 0,
deltaT 1, beta1 = beta2 = 0.85, orth_reg_weight 0.5; ``total_step`` is required (PEFT raises
without it). ``total_step = 0`` means "the run's number of steps": ``prepare`` takes it from the
``InitContext`` the training loop passes every method (``train.steps × train.grad_accum_steps``).

Written on LoRA's variant surface: ``init_site`` (A, E, B), ``factors`` ((A ⊙ E, s·B), so LoRA's
forward, merge and export apply), ``scaling``; the budget and masking are AdaLoRA's own
``prepare`` / ``init_state`` / ``update_state``.

``report()`` gives the final per-layer ranks (``rank_allocation``, plotted by the grid report); ``merge`` folds the current
(masked) ΔW into the kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.methods import core, lora


@dataclasses.dataclass(frozen=True)
class AdaLoRAConfig:
    init_r: int = 12              # initial rank of every targeted layer (budget b0 = init_r · layers)
    target_r: int = 8             # average final rank (budget b_T = target_r · layers)
    alpha: float = 8.0            # output scale alpha / init_r (PEFT: lora_alpha / ranknum)
    dropout: float = 0.0
    targets: str | tuple[str, ...] = lora.DEFAULT_TARGETS
    tinit: int = 0                # warm-up steps at the full budget
    tfinal: int = 0               # final steps at the target budget with the rank pattern fixed
    deltaT: int = 1               # masking interval during the budget phase
    beta1: float = 0.85           # importance EMA
    beta2: float = 0.85           # uncertainty EMA
    orth_reg_weight: float = 0.5  # orthogonality regulariser weight (official scripts: 0.1)
    total_step: int = 0           # 0: the run's length (train.steps × grad_accum_steps, via prepare)


def budget_schedule(step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """(budget, mask now?) at ``step``: PEFT's ``RankAllocator.budget_schedule``."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % deltaT == 0


PARTS = ("lora_A", "lora_E", "lora_B")


@core.register("adalora")
class AdaLoRA(lora.LoRA):
    """SVD-form LoRA whose global rank budget shrinks from init_r to target_r per layer."""

    Config = AdaLoRAConfig
    rewrites_base = False   # one init (N(0, 0.02²) A, B; E = 0): the base stays W0
    peft_lora_flags = None  # its own PEFT type (ADALORA), not a LoraConfig

    def validate(self) -> None:
        c, name = self.config, self.name
        core.check_range(name, "init_r", c.init_r, "an integer >= 1", isinstance(c.init_r, int) and c.init_r >= 1)
        core.check_range(name, "target_r", c.target_r, f"1..init_r={c.init_r}",
                         isinstance(c.target_r, int) and 1 <= c.target_r <= c.init_r)
        core.check_range(name, "dropout", c.dropout, "0 <= dropout < 1", 0 <= c.dropout < 1)
        core.check_range(name, "deltaT", c.deltaT, "an integer >= 1", c.deltaT >= 1)
        core.check_range(name, "tinit", c.tinit, ">= 0", c.tinit >= 0)
        core.check_range(name, "tfinal", c.tfinal, ">= 0", c.tfinal >= 0)
        for f in ("beta1", "beta2"):
            core.check_range(name, f, getattr(c, f), "0 <= beta < 1", 0 <= getattr(c, f) < 1)
        core.check_range(name, "orth_reg_weight", c.orth_reg_weight, ">= 0", c.orth_reg_weight >= 0)
        core.check_range(name, "total_step", c.total_step, "0 (the run's length) or an integer >= 1",
                         isinstance(c.total_step, int) and c.total_step >= 0)
        self.targets = self.match_low_rank_targets(c.targets, "init_r", c.init_r)
        n = len(self.targets)
        self.init_bgt, self.target_bgt = c.init_r * n, c.target_r * n
        self.total_step = None
        self.clip_norm = None   # the run's gradient clipping (``prepare``)
        if c.total_step:
            self._schedule(c.total_step)

    def prepare(self, ctx: core.InitContext) -> None:
        """The budget schedule over the run: ``total_step``, or the run's length when it is 0;
        the run's gradient clipping, which the importance applies to its gradients."""
        self.clip_norm = float(ctx.clip_norm) if ctx.clip_norm else None
        if self.config.total_step:
            return
        if not ctx.total_steps:
            raise ValueError("adalora.total_step=0 means the run's length, which this set-up does "
                             "not give: pass total_step, or an InitContext with total_steps "
                             "(the training loop does)")
        self._schedule(int(ctx.total_steps))

    def _schedule(self, total: int) -> None:
        c = self.config
        if total <= c.tinit + c.tfinal:
            raise ValueError(
                f"adalora: the run's {total} steps are invalid for its budget schedule; valid: "
                f"more than tinit + tfinal = {c.tinit} + {c.tfinal} (the budget must have steps to "
                "shrink over)")
        self.total_step = total
        table = [budget_schedule(t, init_bgt=self.init_bgt, target_bgt=self.target_bgt,
                                 tinit=c.tinit, tfinal=c.tfinal, total_step=total,
                                 deltaT=c.deltaT) for t in range(total + 1)]
        self.budgets = np.array([b for b, _ in table], np.int32)
        self.mask_steps = np.array([m for _, m in table], bool)

    # -- the variant surface ----------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.config.alpha / (self.config.init_r + 1e-5)

    def init_site(self, rng, site, kernel):
        r = self.config.init_r
        fan_in, fan_out = kernel.shape
        ka, kb = jax.random.split(rng)
        return {"lora_A": 0.02 * jax.random.normal(ka, (fan_in, r), kernel.dtype),
                "lora_E": jnp.zeros((r,), kernel.dtype),
                "lora_B": 0.02 * jax.random.normal(kb, (r, fan_out), kernel.dtype)}

    def factors(self, params, dtype, context=None):
        """(A ⊙ E, s·B): ΔW = s · P Λ Q in the kernel's layout, ``((x A) ⊙ E) B`` factored."""
        a = params["lora_A"].astype(dtype) * params["lora_E"].astype(dtype)[None, :]
        return a, params["lora_B"].astype(dtype) * jnp.asarray(self.scaling, dtype)

    # -- state ------------------------------------------------------------------------------
    def init_state(self, rng, base, added, ctx):
        state = {}
        for site in self.targets:
            for part in PARTS:
                shape = added[f"{site}.{part}"].shape
                state[f"{site}.{part}.ipt"] = jnp.zeros(shape, jnp.float32)
                state[f"{site}.{part}.unc"] = jnp.zeros(shape, jnp.float32)
            state[site + ".rank_mask"] = jnp.ones((self.config.init_r,), jnp.float32)
        return state

    # -- training -------------------------------------------------------------------------
    def regularizer(self, trainable, state):
        if self.config.orth_reg_weight == 0:
            return jnp.zeros((), jnp.float32)
        return self.config.orth_reg_weight * orth_penalty(trainable["added"], self.targets)

    def triplet_scores(self, state: core.Flat, site: str) -> jax.Array:
        s = {p: state[f"{site}.{p}.ipt"] * state[f"{site}.{p}.unc"] for p in PARTS}
        return s["lora_E"] + jnp.mean(s["lora_A"], axis=0) + jnp.mean(s["lora_B"], axis=1)

    def update_state(self, state, trainable, grads, step):
        c = self.config
        if self.total_step is None:
            raise ValueError("adalora: the budget schedule needs the run's length; set up the "
                             "method with an InitContext(total_steps=...) or pass total_step")
        total = self.total_step
        if self.clip_norm:   # the gradient as the optimizer used it (optax's own clipping)
            grads, _ = optax.clip_by_global_norm(self.clip_norm).update(grads, optax.EmptyState())
        added, g = trainable["added"], grads["added"]
        boundary = total - c.tfinal
        t = jnp.clip(step, 0, total)
        updating = step < boundary
        state = dict(state)
        # 1. importance EMAs (only while t < T - t_final)
        for site in self.targets:
            for p in PARTS:
                name = f"{site}.{p}"
                ipt = jnp.abs(added[name] * g[name]).astype(jnp.float32)
                avg = c.beta1 * state[name + ".ipt"] + (1 - c.beta1) * ipt
                unc = c.beta2 * state[name + ".unc"] + (1 - c.beta2) * jnp.abs(ipt - avg)
                state[name + ".ipt"] = jnp.where(updating, avg, state[name + ".ipt"])
                state[name + ".unc"] = jnp.where(updating, unc, state[name + ".unc"])
        # 2. the global threshold for this step's budget
        scores = jnp.concatenate([self.triplet_scores(state, s) for s in self.targets])
        n_masked = self.init_bgt - jnp.asarray(self.budgets)[t]
        ordered = jnp.sort(scores)
        threshold = jnp.where(n_masked > 0, ordered[jnp.maximum(n_masked - 1, 0)], -jnp.inf)
        forced = step == boundary
        mask_now = (updating & jnp.asarray(self.mask_steps)[t]) | forced
        apply = mask_now | (step > boundary)
        new_added = dict(added)
        r = c.init_r
        for i, site in enumerate(self.targets):
            keep = (scores[i * r:(i + 1) * r] > threshold).astype(jnp.float32)
            pattern = jnp.where(mask_now, keep, state[site + ".rank_mask"])
            state[site + ".rank_mask"] = pattern
            e = added[site + ".lora_E"]
            new_added[site + ".lora_E"] = jnp.where(apply, e * pattern.astype(e.dtype), e)
            # 3. the final pattern is fixed: reset the importance (PEFT ``reset_ipt``)
            for p in PARTS:
                for k in (".ipt", ".unc"):
                    key = f"{site}.{p}{k}"
                    state[key] = jnp.where(forced, jnp.zeros_like(state[key]), state[key])
        return state, {**trainable, "added": new_added}

    # -- results --------------------------------------------------------------------------
    def ranks(self, state) -> dict[str, int]:
        return {site: int(np.asarray(state[site + ".rank_mask"]).sum()) for site in self.targets}

    def report(self, trainable, state) -> dict:
        ranks = self.ranks(state)
        return {"rank_allocation": ranks,
                "rank_budget": {"init": self.init_bgt, "target": self.target_bgt,
                                "final": int(sum(ranks.values()))}}


def _fro(m: jax.Array) -> jax.Array:
    """Frobenius norm with a finite gradient at 0."""
    sq = jnp.sum(jnp.square(m))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def orth_penalty(added: core.Flat, targets) -> jax.Array:
    """mean over matrices of ||AᵀA - I||_F and ||B Bᵀ - I||_F (A: (in, r), B: (r, out))."""
    terms = []
    for site in targets:
        a = added[site + ".lora_A"].astype(jnp.float32)
        b = added[site + ".lora_B"].astype(jnp.float32)
        terms.append(_fro(a.T @ a - jnp.eye(a.shape[1])))
        terms.append(_fro(b @ b.T - jnp.eye(b.shape[0])))
    return jnp.mean(jnp.stack(terms))

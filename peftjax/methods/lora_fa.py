"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning", arXiv:2308.03303): LoRA with A frozen at its random init, only B trained.

    h = x W0 + s · x A B,   A (in, r) fixed at LoRA's init (kaiming-uniform, or gaussian),
                            B (r, out) trained from 0,  s = alpha / r (alpha / √r with rsLoRA)

So ΔW = s·A B stays in the column space of the fixed random A: half of LoRA's trainable params
(r·out per layer instead of r·(in + out)), and the backward pass needs only x A (tokens × r), not
x, for B's gradient (the paper's activation-memory saving).

Here A is method *state* (``init_state``: LoRA's init per target, drawn from the run's rng, so
every seed of a comparison draws its own A), never differentiated and with no optimizer moments;
only B is in the trainable tree. The forward, merge and adapter sets are LoRA's on the site
params {A from the state, B} (``full_added``): LoRA's one-GEMM forward x (W0 + A B') keeps its
custom VJP, whose A cotangent xᵀ(dy B'ᵀ) is then unused and dropped by XLA, with the need to
keep x for it. Adapter files hold A (state is saved); the Hugging Face PEFT export is a plain
LoRA folder with A and B (``peft_added``), which is also what PEFT's own LoRA-FA saves (a LoRA
model whose lora_A has ``requires_grad=False``); a PEFT LoRA file imports as ``lora``.

PEFT's LoRA-FA (``peft/optimizers/lorafa.py``, ``create_lorafa_optimizer``) is an optimizer,
not a config: it freezes lora_A (so the counts agree with this method's: B and the head) and
trains B with an AdamW in which B's gradient is first *projected* — the 2025 revision of the
paper (same arXiv number, "LoRA-FA: Efficient and Effective Low Rank Representation
Fine-tuning"), which takes the B gradient whose low-rank update best approximates the full
fine-tuning gradient, min ‖s·A ĝ_B − g_W‖_F:

    ĝ_B = (1/s²) (AᵀA + δ I)⁺ g_B     (flax layout; PEFT: g_B (A Aᵀ + δI)⁺ / s², δ = 1e-8)

Default here: the paper's plain LoRA-FA (A frozen, B by the run's AdamW on its raw gradient).
``gradient_projection=True`` adds PEFT's projection as the method's ``gradient_transform`` —
after the run's gradient clipping, before AdamW, as PEFT's optimizer projects the gradient the
Trainer has already clipped — reading A from the method state (the train step passes it to the
optimizer). In float32 throughout; the rest of PEFT's optimizer is the run's AdamW with these
differences, which are settings, not method: PEFT's defaults are eps 1e-6 (``train.eps``),
added to √v before the bias correction (transformers' legacy AdamW: an effective ε/√(1−β₂ᵗ),
larger in the first steps, where optax adds ε to √v̂), weight decay 0 (``train.weight_decay``;
when set, PEFT applies it after the Adam step to every param, biases included, while here it is
AdamW's decoupled decay with biases and norm scales excluded), and PEFT runs the projection
under bf16 autocast where bf16 is available (here float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from peftjax.methods import core, lora

A = "lora_A"
B = "lora_B"
PROJECTION_DELTA = 1e-8   # PEFT's δ in (A Aᵀ + δI)⁺


@dataclasses.dataclass(frozen=True)
class LoRAFAConfig(lora.LoRAConfig):
    # PEFT's LoraFAOptimizer update: B's gradient × (AᵀA + δI)⁺ / s² before AdamW (2025 paper)
    gradient_projection: bool = False


@core.register("lora_fa")
class LoRAFA(lora.LoRA):
    """LoRA with A frozen in the method state; only B trains."""

    Config = LoRAFAConfig
    inits = ("default", "gaussian")   # random A; a base-rewriting init (PiSSA) would need A₀ too

    # -- params: B trainable, A state ------------------------------------------------------
    def init(self, rng, base, ctx):
        """B = 0 per target (LoRA's), so the model starts equal to the base."""
        r = self.config.rank
        return {f"{site}.{B}": jnp.zeros((r, base[site + ".kernel"].shape[1]),
                                         base[site + ".kernel"].dtype)
                for site in self.targets}

    def init_state(self, rng, base, added, ctx):
        """A per target with LoRA's init, from the run's state rng (``fold_in(rng, i)``)."""
        return {f"{site}.{A}": self.init_site(jax.random.fold_in(rng, i), site,
                                              base[site + ".kernel"])[A]
                for i, site in enumerate(self.targets)}

    def full_added(self, added: core.Flat, state: core.Flat) -> core.Flat:
        """LoRA's site params {A, B}: the trained B with the frozen A from the state."""
        missing = [s for s in self.targets if f"{s}.{A}" not in state]
        if missing:
            raise ValueError(f"lora_fa keeps its frozen A in the method state, which lacks it for "
                             f"{len(missing)} target(s) (e.g. {missing[0]}): pass the state from "
                             "setup (or from the adapter file / checkpoint)")
        return {**added, **{f"{s}.{A}": state[f"{s}.{A}"] for s in self.targets}}

    # -- LoRA on the full site params ---------------------------------------------------------
    def hooks(self, added, state, *, train, rng):
        return super().hooks(self.full_added(added, state), state, train=train, rng=rng)

    def merge(self, base, added, state):
        return super().merge(base, self.full_added(added, state), state)

    def unmerge(self, merged, added, state):
        return super().unmerge(merged, self.full_added(added, state), state)

    def low_rank_factors(self, added, state):
        return super().low_rank_factors(self.full_added(added, state), state)

    def peft_added(self, added, state):
        """PEFT's file is a plain LoRA: lora_A (from the state) and lora_B."""
        return self.full_added(added, state)

    # -- PEFT's projected update (optional) ---------------------------------------------------
    def gradient_transform(self, rng: jax.Array) -> optax.GradientTransformation | None:
        if not self.config.gradient_projection:
            return None
        return project_b_gradient(self.targets, self.scaling)


def project_b_gradient(targets: list[str], scaling: float) -> optax.GradientTransformation:
    """g_B ↦ (AᵀA + δI)⁺ g_B / s² for every target's B (PEFT's LoraFAOptimizer), A read from the
    method state the train step passes as ``method_state``; other gradients pass unchanged."""

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, method_state=None, **extra):
        del params, extra
        if method_state is None:
            raise ValueError("lora_fa.gradient_projection reads the frozen A from the method state: "
                             "call update(..., method_state=state) (the train step does)")
        added = dict(updates["added"])
        for site in targets:
            a = method_state[f"{site}.{A}"].astype(jnp.float32)
            g = added[f"{site}.{B}"]
            r = a.shape[1]
            inverse = jnp.linalg.pinv(a.T @ a + PROJECTION_DELTA * jnp.eye(r, dtype=jnp.float32))
            added[f"{site}.{B}"] = ((inverse @ g.astype(jnp.float32)) / scaling ** 2).astype(g.dtype)
        return {**updates, "added": added}, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

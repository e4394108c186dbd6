"""Child-tuning (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model"; code:
alibaba/AliceMind ``ChildTuning/ChildTuningOptimizer.py``).

Child-tuning_F (task-free) trains every base param, as full fine-tuning does, but at each
optimizer step t masks the gradient with a fresh Bernoulli mask and rescales it::

    M_t ~ Bernoulli(p)   (elementwise, independently per step and per entry)
    g̃_t = g_t ⊙ M_t / p  (so E[g̃_t] = g_t)

and feeds g̃_t to AdamW. Default p = 0.3 (the reference's ``reserve_p``). The reference applies
the mask inside its AdamW step to every parameter the optimizer holds, the classifier included;
``mask_head=False`` leaves the head's gradient unmasked.

Here the mask is an optax ``GradientTransformation`` (``Method.gradient_transform``) that the
optimizer places after global-norm clipping and before AdamW: the reference masks inside its
AdamW step, after the trainer (transformers' Trainer, ``max_grad_norm``) has clipped the raw
gradients, so the clipping norm is that of the unmasked gradient. Its state holds a key and a
step count; the mask of step t for the i-th leaf is drawn from ``fold_in(fold_in(key, t), i)``,
so a run (and a resumed run, which restores the count) draws the same masks. The key comes from
the run's seed (each seed of a comparison draws other masks) unless ``seed`` pins it.

The draws are 16-bit (``peftjax.models.layers.dropout``'s keep masks), not
``jax.random.bernoulli``'s one threefry evaluation per entry: a mask covers every trainable
entry at every step, and on CPU jax's rolled threefry loop made it cost a fifth of the step
(MiniLM, ``scripts/bench.py --methods=full,child_tuning_f --batch=32 --seq=40``, 2 cores:
0.839 → 0.687 s a step, full fine-tuning's 0.70; compiling the step takes 14.3 → 16.3 s, the
hash unrolled once per leaf). So p is rounded to a multiple of 1/65536 (0.3 → 0.300003) and
the kept entries are divided by that exact rate, which keeps E[g̃_t] = g_t; p = 1 masks nothing.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from peftjax.methods import core
from peftjax.models import layers


class ChildTuningFState(NamedTuple):
    seed: jax.Array    # uint32 PRNG key data
    count: jax.Array   # int32: masks drawn so far


def bernoulli_gradient_mask(p: float, key: jax.Array, mask_head: bool = True
                            ) -> optax.GradientTransformation:
    """g ↦ g ⊙ Bernoulli(p) / p with a fresh mask per update (Child-tuning_F), drawn from ``key``.

    Applied to a trainable tree ``{"base", "added", "head"}`` (the head is left alone when
    ``mask_head`` is false) or to any pytree (all leaves masked).
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"child_tuning_f.reserve_p={p!r} is invalid; valid: (0, 1]")

    def init_fn(params):
        del params
        return ChildTuningFState(jnp.asarray(key), jnp.zeros((), jnp.int32))

    def mask_tree(tree, key):
        # g ⊙ M / p is inverted dropout of the gradient at rate 1 - p (p = 1: g unchanged).
        leaves, treedef = jax.tree.flatten(tree)
        return jax.tree.unflatten(treedef, [layers.dropout(g, 1.0 - p, jax.random.fold_in(key, i))
                                            for i, g in enumerate(leaves)])

    def update_fn(updates, state, params=None):
        del params
        key = jax.random.fold_in(state.seed, state.count)
        if isinstance(updates, dict) and not mask_head and "head" in updates:
            masked = mask_tree({k: v for k, v in updates.items() if k != "head"}, key)
            updates = {**masked, "head": updates["head"]}
        else:
            updates = mask_tree(updates, key)
        return updates, ChildTuningFState(state.seed, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


@core.register("child_tuning_f")
class ChildTuningF(core.Method):
    """Full fine-tuning whose gradients pass through a fresh Bernoulli(p)/p mask each step."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        reserve_p: float = 0.3         # p: the expected fraction of each gradient kept
        mask_head: bool = True         # the reference masks every optimised param, classifier included
        seed: int = -1                 # -1: masks from the run's seed; a seed >= 0 pins them

    family = "selection"

    def validate(self) -> None:
        c = self.config
        core.check_range("child_tuning_f", "reserve_p", c.reserve_p, "(0, 1]",
                         isinstance(c.reserve_p, (int, float)) and 0.0 < c.reserve_p <= 1.0)
        core.check_range("child_tuning_f", "seed", c.seed, "-1 (the run's seed) or a seed >= 0",
                         isinstance(c.seed, int) and not isinstance(c.seed, bool) and c.seed >= -1)

    def trains_base(self, path: str) -> bool:
        return True

    def gradient_transform(self, rng):
        c = self.config
        key = rng if c.seed < 0 else jax.random.PRNGKey(c.seed)
        return bernoulli_gradient_mask(float(c.reserve_p), key, c.mask_head)


# --------------------------------------------------------------------------------------------
# Child-tuning_D (task-driven).

import re  # noqa: E402

from peftjax.methods import fisher, pass_cache  # noqa: E402
from peftjax.methods.fishmask import SparseSelection, _size  # noqa: E402

LAYER = re.compile(r"\.(layers?|h)\.\d+\.")   # BERT encoder.layer.N, Llama model.layers.N, GPT-2/BLOOM transformer.h.N


@core.register("child_tuning_d")
class ChildTuningD(SparseSelection):
    """Child-tuning_D: a fixed child network of the encoder layers chosen by Fisher information.

    One pass over the training set gives, per encoder-layer param θ (paths with ``layer`` in them,
    as in the reference; embeddings, pooler and head are not masked and train whole),

        F_θ = (1/B) Σ_b clip(∂L_b/∂θ)²,   clip = per-param gradient-norm clipping to
                                           ``max_grad_norm`` (1.0, the reference's default)

    and the child network is the global top ``reserve_p`` fraction of those entries (the
    reference keeps F ≥ the (1 − p) percentile; here exactly k = round(p · n) entries, so ties at
    the threshold are broken by position). Training updates only the child network's entries,
    with no rescaling (Xu et al. 2021, §3.2; AliceMind ``ChildTuning/``). Default p = 0.3.

    Differences from the reference, by design: the Fisher pass runs in eval mode (no dropout) on
    the training loop's Fisher batches (8 rows), and masked entries stay exactly fixed (the
    reference's AdamW still applies decoupled weight decay to them). The child entries are kept
    in the sparse representation of ``fishmask.SparseSelection``.
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        reserve_p: float = 0.3
        max_grad_norm: float = 1.0
        progress: bool = True
        representation: str = "sparse"   # "sparse": values + indices; "dense": masked whole params

    def validate(self) -> None:
        c = self.config
        self._check_representation()
        core.check_range("child_tuning_d", "reserve_p", c.reserve_p, "(0, 1]",
                         isinstance(c.reserve_p, (int, float)) and 0.0 < c.reserve_p <= 1.0)
        core.check_range("child_tuning_d", "max_grad_norm", c.max_grad_norm, "> 0",
                         c.max_grad_norm > 0)
        if self.num_selected(self._abstract()) < 1:
            raise ValueError("child_tuning_d: the model has no encoder-layer params "
                             f"(paths matching {LAYER.pattern!r}) to select from, or reserve_p "
                             "is too small to keep one")

    def trains_base(self, path: str) -> bool:
        return not LAYER.search(path)   # outside the encoder layers: trained whole

    def num_selected(self, abstract_base: dict) -> int:
        n = sum(_size(v) for p, v in abstract_base.items()
                if not self.sites.is_head(p) and not self.trains_base(p))
        return int(round(self.config.reserve_p * n))

    def select(self, base: dict, ctx: core.InitContext) -> dict:
        c = self.config
        if ctx.train_batches is None or ctx.loss_fn is None:
            raise ValueError("child_tuning_d needs training data for its Fisher estimate: pass an "
                             "InitContext with train_batches and loss_fn (the training loop does)")
        paths = self.candidate_paths(base)
        scores, _ = pass_cache.cached(
            ctx, "child_tuning_d_fisher", {"max_grad_norm": c.max_grad_norm, "paths": paths}, base,
            lambda: fisher.clipped_batch_fisher(ctx.loss_fn, base, paths, ctx.train_batches(),
                                                c.max_grad_norm, desc="child_tuning_d Fisher",
                                                progress=c.progress))
        return fisher.global_top_k(scores, self.num_selected(base))

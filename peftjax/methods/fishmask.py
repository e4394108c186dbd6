"""FishMask (Sung, Nair & Raffel, NeurIPS 2021, "Training Neural Networks with Fixed Sparse
Masks"; code: varunnair18/FISH).

A fixed sparse mask of the k base-param entries with the largest empirical Fisher information

    F̂_θ = (1/N) Σ_{i=1..N} (∂ log p(y_i | x_i; θ) / ∂θ)²

over the first N training examples at batch size 1, on their true labels (N = 1024), chosen
globally over all params (one top-k, not per layer). The budget is a keep ratio of the model's
params, k = round(keep_ratio · |θ|) (0.5% in the paper). As in the paper the classifier (task
head) is always trained and counts inside the budget: k − |head| entries are chosen from the rest
(``head_in_budget=False`` chooses k entries outside the head and trains the head on top).

Sparse representation (``representation="sparse"``, the default): ``trainable["base"][path]``
holds only the selected entries of that param (a vector, one per param with at least one selected
entry) and ``state[path + ".indices"]`` their int32 flat indices; ``effective_base`` scatters the
values into the frozen weight. Gradients, optimizer state and the saved adapter therefore scale
with k, not with the model.

Dense masked mode (``representation="dense"``), for comparison: every param with a selected entry
is trainable whole and ``state[path + ".mask"]`` holds its boolean mask; the forward pass uses
``where(mask, trainable, frozen)``. By the chain rule the gradient is then the full gradient times
the 0/1 mask, i.e. exactly "fine-tune with masked gradients" — and, unlike masking the gradient
alone, entries outside the mask stay bit-identical under AdamW's decoupled weight decay (which
would otherwise shrink them). Per selected entry the optimizer sees the same gradients as in the
sparse mode, so both modes follow the same trajectory (tests/methods/test_fishmask.py); the dense
one pays gradients and optimizer state for whole params (and keeps a frozen copy of them).
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from peftjax.methods import core, fisher, pass_cache

log = logging.getLogger(__name__)
INDICES = ".indices"
MASK = ".mask"
REPRESENTATIONS = ("sparse", "dense")


def _size(v) -> int:
    return int(np.prod(np.shape(v), dtype=np.int64))


class SparseSelection(core.Method):
    """Shared machinery: a fixed set of base entries, trained as sparse value vectors."""

    family = "selection"

    def trains_base(self, path: str) -> bool:
        """Params trained whole (none here); the selected entries live in sparse vectors."""
        return False

    # -- budget ---------------------------------------------------------------------------
    def _abstract(self) -> dict:
        from flax import traverse_util

        return traverse_util.flatten_dict(self.model.abstract_params(), sep=".")

    def candidate_paths(self, base: dict) -> list[str]:
        """Params the selection chooses entries from."""
        return [p for p in base if not self.sites.is_head(p) and not self.trains_base(p)]

    def accounting(self) -> dict:
        """How the head is counted, stated beside the counts (scripts/count_params.py)."""
        if self.config.head_in_budget:
            return {"count_rule": f"head inside the budget (Sung et al. 2021): trainable_params + "
                                  f"head_params = round({self.config.keep_ratio} x total_params)"}
        return {"count_rule": f"head outside the budget: trainable_params = round("
                              f"{self.config.keep_ratio} x total_params), head_params trained on top"}

    def num_selected(self, abstract_base: dict) -> int:
        raise NotImplementedError

    def count_selected(self, abstract_base: dict) -> int:
        """Trainable base entries (outside the head), from shapes alone (``core.count_params``)."""
        return self.num_selected(abstract_base)

    def count_added(self, abstract_base: dict) -> int:
        return 0

    def _check_representation(self) -> None:
        r = self.config.representation
        core.check_range(self.name, "representation", r, " | ".join(REPRESENTATIONS),
                         r in REPRESENTATIONS)

    # -- selection ------------------------------------------------------------------------
    def select(self, base: dict, ctx: core.InitContext) -> dict[str, np.ndarray]:
        """Sorted int32 flat indices of the selected entries, per candidate path."""
        raise NotImplementedError

    def setup(self, rng, base: dict, ctx: core.InitContext | None = None) -> core.PeftParams:
        """The protocol's ``setup`` for a selection: the chosen entries become trainable value
        vectors (or masked whole params) and their indices (masks) the state."""
        ctx = ctx or core.InitContext()
        self.prepare(ctx)
        selected = self.select(base, ctx)
        whole, head, frozen = self.partition(base)
        values, state = dict(whole), {}
        dense = self.config.representation == "dense"
        for path, idx in selected.items():
            if idx.size == 0:
                continue
            if dense:  # the whole param trains; the mask picks which entries the model sees
                mask = np.zeros(_size(base[path]), bool)
                mask[idx] = True
                values[path] = jnp.array(base[path], copy=True)
                state[path + MASK] = jnp.asarray(mask.reshape(np.shape(base[path])))
            else:
                values[path] = jnp.asarray(np.asarray(base[path]).reshape(-1)[idx])
                state[path + INDICES] = jnp.asarray(idx, jnp.int32)
        return core.PeftParams({"base": values, "added": {}, "head": head}, frozen, state)

    def effective_base(self, trainable: dict, frozen: dict, state: dict) -> dict:
        out = dict(frozen)
        for path, values in trainable["base"].items():
            if path + MASK in state:   # dense masked mode
                out[path] = jnp.where(state[path + MASK], values.astype(frozen[path].dtype),
                                      frozen[path])
                continue
            if path + INDICES not in state:  # a param trained whole
                out[path] = values
                continue
            w = frozen[path]
            out[path] = w.reshape(-1).at[state[path + INDICES]].set(
                values.astype(w.dtype), unique_indices=True, indices_are_sorted=True).reshape(w.shape)
        out.update(trainable["head"])
        return out

    def dense_mask(self, state: dict, frozen: dict) -> dict[str, np.ndarray]:
        """The selection as boolean masks shaped like the params (for analysis and tests)."""
        out = {}
        for path, w in frozen.items():
            m = np.zeros(_size(w), bool)
            if path + INDICES in state:
                m[np.asarray(state[path + INDICES])] = True
            elif path + MASK in state:
                m = np.asarray(state[path + MASK]).reshape(-1)
            out[path] = m.reshape(np.shape(w))
        return out


@core.register("fishmask")
class FishMask(SparseSelection):

    @dataclasses.dataclass(frozen=True)
    class Config:
        keep_ratio: float = 0.005        # k / |θ| (the paper's 0.5%)
        num_examples: int = 1024         # N examples for the Fisher, at batch size 1
        head_in_budget: bool = True      # the classifier counts inside k (the paper)
        fisher_chunk: int = 8            # examples per jitted Fisher call (a lax.scan over them)
        progress: bool = True
        representation: str = "sparse"   # "sparse": values + indices; "dense": masked whole params

    def validate(self) -> None:
        c = self.config
        self._check_representation()
        core.check_range("fishmask", "keep_ratio", c.keep_ratio, "(0, 1]",
                         isinstance(c.keep_ratio, (int, float)) and 0.0 < c.keep_ratio <= 1.0)
        core.check_range("fishmask", "num_examples", c.num_examples, ">= 1",
                         isinstance(c.num_examples, int) and c.num_examples >= 1)
        core.check_range("fishmask", "fisher_chunk", c.fisher_chunk, ">= 1", c.fisher_chunk >= 1)
        abstract = self._abstract()
        total = sum(_size(v) for v in abstract.values())
        head = sum(_size(v) for p, v in abstract.items() if self.sites.is_head(p))
        k = self.num_selected(abstract)
        if k < 1:
            raise ValueError(
                f"fishmask.keep_ratio={c.keep_ratio} keeps round({c.keep_ratio} x {total}) = "
                f"{int(round(c.keep_ratio * total))} params, not more than the task head's {head} "
                "that count inside the budget (head_in_budget=True); raise keep_ratio or set "
                "head_in_budget=False")
        if k > total - head:
            raise ValueError(f"fishmask.keep_ratio={c.keep_ratio} selects {k} entries, more than "
                             f"the {total - head} outside the head; lower keep_ratio")

    def num_selected(self, abstract_base: dict) -> int:
        total = sum(_size(v) for v in abstract_base.values())
        k = int(round(self.config.keep_ratio * total))
        if self.config.head_in_budget:
            k -= sum(_size(v) for p, v in abstract_base.items() if self.sites.is_head(p))
        return k

    def select(self, base: dict, ctx: core.InitContext) -> dict[str, np.ndarray]:
        c = self.config
        if ctx.train_batches is None or ctx.loss_fn is None:
            raise ValueError("fishmask needs training data for its Fisher estimate: pass an "
                             "InitContext with train_batches and loss_fn (the training loop does)")
        available = getattr(ctx, "num_train_examples", None)
        if available is not None and c.num_examples > available:
            raise ValueError(f"fishmask.num_examples={c.num_examples} is larger than the training "
                             f"set ({available} examples); valid: 1..{available}")
        paths = self.candidate_paths(base)
        scores, used = pass_cache.cached(
            ctx, "fishmask_fisher", {"num_examples": c.num_examples, "chunk": c.fisher_chunk,
                                  "paths": paths}, base,
            lambda: fisher.empirical_fisher(
                ctx.loss_fn, base, paths, fisher.rechunk(ctx.train_batches(), c.fisher_chunk),
                c.num_examples, desc="fishmask Fisher", progress=c.progress))
        if used < c.num_examples:
            raise ValueError(f"fishmask.num_examples={c.num_examples} is larger than the training "
                             f"set ({used} examples)")
        return fisher.global_top_k(scores, self.num_selected(base))


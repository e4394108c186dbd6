"""Merging several fine-tuned adapters into one: task arithmetic on their weight updates.

Every adapter is first turned into its *task vector* per adapted linear site, the dense update
it makes to the frozen kernel, τ = W' − W0 (flax (in, out) layout), computed from the method's
own merge (``task_vectors``): for LoRA/rsLoRA that is s·A B with s = α/r or α/√r, for DoRA
m ⊙ (W0 + s·A B)/‖W0 + s·A B‖_c − W0 (its magnitude included), for VeRA Λ_b B Λ_d A — so every
scaling is right by construction. (PEFT's ``add_weighted_adapter`` combines A and B factors and
is reported wrong for rsLoRA and DoRA.) The combinations, per site, with weights w_i:

* ``linear``: τ = Σ w_i τ_i (Ilharco et al. 2023, task arithmetic).
* ``magnitude_prune``: each τ_i keeps its top ``density`` fraction of entries by |·|, then linear.
* ``ties`` (Yadav et al. 2023, §3): trim each τ_i to its top ``density`` by magnitude; elect
  the sign per entry, γ = sign(Σ_i w_i τ̂_i) (total mass); disjoint mean over the adapters that
  agree with it: τ = Σ_i w_i τ̂_i [sign(τ̂_i) = γ] / max(1, #{i: τ̂_i ≠ 0, sign(τ̂_i) = γ}).
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, Eq. 1): drop each entry of τ_i with
  probability 1 − ``density`` and rescale the kept ones by 1/``density`` (seeded), then linear
  or TIES' sign election and disjoint mean.

The merged τ is re-factorised to a plain LoRA of rank ``rank`` by SVD (Eckart–Young: the best
rank-``rank`` approximation, τ ≈ (U_r √S_r)(√S_r V_rᵀ)), or of the exact rank of τ when
``rank`` is None.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from peftjax.methods import core

COMBINATIONS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
COMBINED = "lora"   # a merge of low-rank updates is stored as a plain LoRA


def task_vectors(method: core.Method, trainable: Mapping, frozen: Mapping, state: Mapping
                 ) -> dict[str, np.ndarray]:
    """``{site: W' − W0}`` of a trained adapter on its (pretrained) base, from the method's own
    merge. Only kernels that change are returned; a method that rewrites the base (PiSSA) is
    measured against the pretrained kernel it started from (its residual plus the initial
    adapter), which ``frozen`` must then hold."""
    if not method.mergeable:
        raise ValueError(f"method {method.name!r} has no merge, so no task vector; mergeable "
                         f"methods: {', '.join(m for m in core.registered() if core.method_class(m).mergeable)}")
    base = method.effective_base(trainable, frozen, state)
    merged = method.merged_params(trainable, frozen, state)
    out = {}
    for path, w in merged.items():
        if path.endswith(".kernel") and not method.sites.is_head(path):
            delta = np.asarray(w, np.float64) - np.asarray(base[path], np.float64)
            if np.any(delta):
                out[path[: -len(".kernel")]] = delta
    return out


def _top_fraction(t: np.ndarray, density: float) -> np.ndarray:
    """``t`` with all but its ``density`` fraction of largest-magnitude entries set to 0."""
    k = int(round(density * t.size))
    if k >= t.size:
        return t
    if k <= 0:
        return np.zeros_like(t)
    threshold = np.partition(np.abs(t).ravel(), t.size - k)[t.size - k]
    return np.where(np.abs(t) >= threshold, t, 0.0)


def _disjoint_mean(tensors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """TIES' sign election by total mass and mean over the agreeing, non-zero entries."""
    weighted = tensors * weights[:, None, None]
    sign = np.sign(weighted.sum(axis=0))
    agree = (np.sign(tensors) == sign[None]) & (tensors != 0)
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def combine_tensors(tensors: Sequence[np.ndarray], weights: Sequence[float], combination: str,
                    *, density: float = 1.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """One site's merged task vector from the adapters' ``tensors`` (same shape)."""
    if combination not in COMBINATIONS:
        raise ValueError(f"combination {combination!r} is invalid; valid: {', '.join(COMBINATIONS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r} is invalid; valid: 0 < density <= 1")
    t = np.stack([np.asarray(x, np.float64) for x in tensors])
    w = np.asarray(weights, np.float64)
    if combination == "linear":
        return np.tensordot(w, t, axes=1)
    if combination in ("magnitude_prune", "ties"):
        t = np.stack([_top_fraction(x, density) for x in t])
    else:  # DARE: drop with probability 1 - density, rescale the survivors
        if rng is None:
            raise ValueError(f"{combination} is random: pass a seeded rng")
        t = np.where(rng.random(t.shape) < density, t / density, 0.0)
    if combination in ("magnitude_prune", "dare_linear"):
        return np.tensordot(w, t, axes=1)
    return _disjoint_mean(t, w)


def refactor(delta: np.ndarray, rank: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(A (in, r), B (r, out)) with A B the best rank-r approximation of ``delta``; ``rank``
    None keeps every non-zero singular value (exact)."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    if rank is None:
        rank = max(1, int(np.sum(s > s.max() * 1e-12))) if s.size and s.max() > 0 else 1
    rank = min(rank, s.size)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def merge_task_vectors(vectors: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                       combination: str = "linear", *, density: float = 1.0, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """``{site: merged task vector}`` over the union of the adapters' sites (an adapter that does
    not adapt a site contributes zeros there). DARE draws from ``seed`` (per site, in order)."""
    if len(vectors) != len(weights) or not vectors:
        raise ValueError(f"merging needs one weight per adapter, got {len(vectors)} adapters and "
                         f"{len(weights)} weights")
    rng = np.random.default_rng(seed)
    sites = list(dict.fromkeys(s for v in vectors for s in v))
    out = {}
    for site in sites:
        shape = next(v[site].shape for v in vectors if site in v)
        tensors = [v.get(site, np.zeros(shape)) for v in vectors]
        out[site] = combine_tensors(tensors, weights, combination, density=density, rng=rng)
    return out


def as_lora(model, merged: Mapping[str, np.ndarray], rank: int | None,
            sites: core.Sites | None = None) -> tuple[core.Method, dict]:
    """The merged task vectors as one plain LoRA (scaling 1): ``(method, trainable)``.

    With ``rank`` None each site keeps its exact rank; the LoRA's rank is then the largest, and
    narrower sites are padded with zero columns (adding nothing)."""
    factors = {s: refactor(d, rank) for s, d in merged.items()}
    r = max(a.shape[1] for a, _ in factors.values())
    added = {}
    for site, (a, b) in factors.items():
        pad = r - a.shape[1]
        added[site + ".lora_A"] = jnp.asarray(np.pad(a, ((0, 0), (0, pad))))
        added[site + ".lora_B"] = jnp.asarray(np.pad(b, ((0, pad), (0, 0))))
    targets = core.exact_paths_regex(factors)
    method = core.create(COMBINED, model, {"rank": r, "alpha": float(r), "targets": targets}, sites=sites)
    return method, {"base": {}, "added": added, "head": {}}

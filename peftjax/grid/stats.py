"""Uncertainty of a comparison: paired bootstrap confidence intervals over test examples × seeds.

A method's score is the mean over its seeds of the metric on the whole test split. Two sources of
variation matter when comparing methods: which test examples happened to be drawn, and which
seeds (initialisation, data order, dropout). The bootstrap resamples both (Efron & Tibshirani
1993; over seeds as well as examples, as Dror et al. 2018 recommend for comparisons of trained
models):

    for b = 1..B:  I_b ~ n test indices with replacement,  S_b ~ k seed indices with replacement
                   score_b(M) = mean_{s ∈ S_b} metric(pred_M,s[I_b], y[I_b])

The 95% interval is the 2.5 and 97.5 percentiles of score_b. A *difference* between two methods
uses the same (I_b, S_b) for both (paired: seed s of every method shares the run's data order and
head initialisation), so the interval of score_b(A) − score_b(B) reflects the variation that
matters for the comparison; a difference whose interval excludes 0 is marked significant. Two
methods whose own intervals overlap are never ranked against each other.

Metrics come from confusion counts, vectorised over all (b, s) at once: accuracy = trace / n,
macro-F1 = the unweighted mean over the classes present (in labels or predictions) of
2TP / (2TP + FP + FN) — ``peftjax.data.metrics``'s definitions, checked against them in the tests.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

METRICS = ("accuracy", "macro_f1")


@dataclasses.dataclass(frozen=True)
class Resamples:
    """The shared bootstrap draws of one task: example indices (B, n) and seed indices (B, k)."""

    examples: np.ndarray
    seeds: np.ndarray

    @classmethod
    def draw(cls, n: int, k: int, b: int = 2000, seed: int = 0) -> "Resamples":
        rng = np.random.default_rng([seed, n, k])
        return cls(rng.integers(0, n, size=(b, n)), rng.integers(0, k, size=(b, k)))


def _scores(preds: np.ndarray, labels: np.ndarray, metric: str, draws: Resamples,
            num_classes: int) -> np.ndarray:
    """(B,) bootstrap scores of one method: ``preds`` (k seeds, n examples)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} has no bootstrap; valid: {', '.join(METRICS)}")
    preds = np.asarray(preds, np.int64)
    labels = np.asarray(labels, np.int64)
    c = num_classes
    b, n = draws.examples.shape
    out = np.empty(b)
    for i in range(b):
        idx = draws.examples[i]
        y = labels[idx]
        per_seed = []
        for s in np.unique(draws.seeds[i]):
            p = preds[s, idx]
            conf = np.bincount(y * c + p, minlength=c * c).reshape(c, c)
            per_seed.append(_metric_from_confusion(conf, metric))
        weights = np.bincount(draws.seeds[i], minlength=preds.shape[0])[np.unique(draws.seeds[i])]
        out[i] = float(np.dot(per_seed, weights) / weights.sum())
    return out


def _metric_from_confusion(conf: np.ndarray, metric: str) -> float:
    """accuracy or macro-F1 from a (true, predicted) confusion matrix."""
    if metric == "accuracy":
        return float(np.trace(conf) / conf.sum())
    tp = np.diag(conf).astype(float)
    fp = conf.sum(axis=0) - tp
    fn = conf.sum(axis=1) - tp
    present = (conf.sum(axis=0) + conf.sum(axis=1)) > 0
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return float(f1[present].mean())


def point(preds: np.ndarray, labels: np.ndarray, metric: str, num_classes: int) -> float:
    """The mean over seeds of the metric on the whole split."""
    labels = np.asarray(labels, np.int64)
    c = num_classes
    values = []
    for p in np.asarray(preds, np.int64):
        conf = np.bincount(labels * c + p, minlength=c * c).reshape(c, c)
        values.append(_metric_from_confusion(conf, metric))
    return float(np.mean(values))


@dataclasses.dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high


def interval(preds: np.ndarray, labels: np.ndarray, metric: str, draws: Resamples,
             num_classes: int, level: float = 0.95) -> Interval:
    """The score (mean over seeds on the whole split) and its bootstrap interval."""
    scores = _scores(preds, labels, metric, draws, num_classes)
    lo, hi = np.quantile(scores, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(point(preds, labels, metric, num_classes), float(lo), float(hi))


def difference(preds_a: np.ndarray, preds_b: np.ndarray, labels: np.ndarray, metric: str,
               draws: Resamples, num_classes: int, level: float = 0.95) -> Interval:
    """score(A) − score(B) with a paired bootstrap interval (the same draws for both).

    Both need the same number of seeds (seed index s of A is paired with seed index s of B).
    """
    preds_a, preds_b = np.asarray(preds_a), np.asarray(preds_b)
    if preds_a.shape != preds_b.shape:
        raise ValueError(f"paired predictions must match in shape (seeds, examples): "
                         f"{preds_a.shape} vs {preds_b.shape}")
    diff = (_scores(preds_a, labels, metric, draws, num_classes)
            - _scores(preds_b, labels, metric, draws, num_classes))
    lo, hi = np.quantile(diff, [(1 - level) / 2, 1 - (1 - level) / 2])
    est = point(preds_a, labels, metric, num_classes) - point(preds_b, labels, metric, num_classes)
    return Interval(est, float(lo), float(hi))


def unranked_groups(intervals: Sequence[Interval]) -> list[int]:
    """Tier labels (0 = best): the groups of intervals joined by overlaps, best first.

    Two methods get different tiers only when their intervals do not overlap, and then every
    method of the better tier lies entirely above every method of the worse one, so reading
    the tiers as a ranking never ranks two methods whose intervals overlap. A chain of
    overlapping intervals (A overlaps B, B overlaps C) is therefore one tier even where A and C
    do not overlap: splitting it anywhere would rank a pair that overlaps. The paired
    differences (:func:`difference`) are the finer test between two methods."""
    order = sorted(range(len(intervals)), key=lambda i: -intervals[i].high)
    tiers = [0] * len(intervals)
    tier, floor = 0, None   # floor: the lowest bound of the current tier so far
    for i in order:
        if floor is not None and intervals[i].high < floor:
            tier += 1
            floor = intervals[i].low
        else:
            floor = intervals[i].low if floor is None else min(floor, intervals[i].low)
        tiers[i] = tier
    return tiers

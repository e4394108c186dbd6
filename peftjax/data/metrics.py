"""Evaluation metrics in plain numpy.

Why not sklearn/scipy: neither is a dependency of peftjax (scipy may happen to be installed, but we
do not rely on it), and these formulas are short enough to own and test against hand-computed
values. Conventions match sklearn/scipy where they matter for reported numbers:

* `macro_f1` averages per-class F1 over the classes that occur in labels or predictions
  (sklearn's default `labels=None`), and a class with no true or predicted positives scores 0.
* `f1` is the binary F1 of the positive class (label 1), 0 when there are no true positives.
* `mcc` is the multiclass Matthews correlation (Gorodkin's R_K, as sklearn), 0 when undefined.
* `pearson` / `spearman` return NaN when an input is constant (the correlation is undefined),
  like scipy; `spearman` ranks with ties averaged.

All functions return Python floats in [0, 1] (correlations in [-1, 1]), never percentages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:  # tasks imports this module; avoid the cycle at runtime.
    from peftjax.data.tasks import Task


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions and labels differ in size: {p.shape} vs {y.shape}")
    if p.size == 0:
        raise ValueError("metrics need at least one example")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of exact matches."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def _f1_of_class(p: np.ndarray, y: np.ndarray, cls: int) -> float:
    tp = np.sum((p == cls) & (y == cls))
    fp = np.sum((p == cls) & (y != cls))
    fn = np.sum((p != cls) & (y == cls))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if tp > 0 else 0.0


def f1(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of the `positive` class (GLUE's F1 for MRPC and QQP)."""
    p, y = _pair(predictions, labels)
    return _f1_of_class(p, y, positive)


def macro_f1(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Unweighted mean of per-class F1 over classes present in labels or predictions.

    Why macro: on the imbalanced tweet corpus (positive is 18%) accuracy rewards ignoring the
    minority class; macro F1 does not.
    """
    p, y = _pair(predictions, labels)
    classes = np.union1d(p, y)
    return float(np.mean([_f1_of_class(p, y, c) for c in classes]))


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient, multiclass form (CoLA's GLUE metric).

    MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)) with c the number
    of correct predictions, s the number of samples, p_k / t_k predicted / true counts of class k.
    Returns 0.0 when the denominator vanishes (e.g. a constant predictor), as sklearn does.
    """
    p, y = _pair(predictions, labels)
    classes, inverse = np.unique(np.concatenate([p, y]), return_inverse=True)
    pi, yi = inverse[: p.size], inverse[p.size :]
    k = classes.size
    pred_counts = np.bincount(pi, minlength=k).astype(np.float64)
    true_counts = np.bincount(yi, minlength=k).astype(np.float64)
    correct = float(np.sum(pi == yi))
    s = float(p.size)
    cov_ytyp = correct * s - np.dot(pred_counts, true_counts)
    cov_ypyp = s * s - np.dot(pred_counts, pred_counts)
    cov_ytyt = s * s - np.dot(true_counts, true_counts)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


mcc = matthews_corrcoef


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation; NaN if either input is constant."""
    p, y = _pair(predictions, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    dp, dy = p - p.mean(), y - y.mean()
    denom = np.sqrt(np.dot(dp, dp) * np.dot(dy, dy))
    if denom == 0:
        return float("nan")
    return float(np.clip(np.dot(dp, dy) / denom, -1.0, 1.0))


def rankdata(values: ArrayLike) -> np.ndarray:
    """Ranks 1..n, ties get the mean of the ranks they span (scipy's method='average')."""
    v = np.asarray(values).reshape(-1)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]  # exclusive
    avg_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    run_of = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = avg_rank[run_of]
    return ranks


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation = Pearson of tie-averaged ranks; NaN if an input is constant."""
    p, y = _pair(predictions, labels)
    return pearson(rankdata(p), rankdata(y))


def majority_rate(labels: ArrayLike) -> float:
    """Accuracy of always predicting the most frequent label: the floor a model must beat."""
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        raise ValueError("majority_rate needs at least one label")
    _, counts = np.unique(y, return_counts=True)
    return float(counts.max() / y.size)


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "f1": f1,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task: Task, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """All of `task.metrics` for one evaluation.

    Args:
      task: the task (decides classification vs regression and which metrics).
      predictions: class ids [N], or logits [N, num_labels] (arg-maxed here) for classification;
        scores [N] or [N, 1] for regression.
      labels: gold labels [N]. Negative classification labels mean "unlabelled" (GLUE test
        splits) and are rejected, because scoring them would silently produce garbage.

    Returns:
      {metric name: value} in the order of `task.metrics`.
    """
    p = np.asarray(predictions)
    y = np.asarray(labels).reshape(-1)
    if task.kind == "classification":
        if p.ndim == 2:
            if p.shape[1] != task.num_labels:
                raise ValueError(f"logits have {p.shape[1]} columns, task {task.name} has {task.num_labels} labels")
            p = p.argmax(axis=-1)
        if y.size and y.min() < 0:
            raise ValueError(f"labels contain negative values (unlabelled test split?) for task {task.name}")
    else:
        p = p.reshape(-1).astype(np.float64)
        y = y.astype(np.float64)
    return {name: METRICS[name](p, y) for name in task.metrics}

"""Paired bootstrap intervals over test examples × seeds."""

import numpy as np
import pytest

from peftjax.data import metrics
from peftjax.grid import stats


def _preds(rng, labels, accuracy, k=3):
    out = []
    for _ in range(k):
        p = labels.copy()
        flip = rng.random(len(labels)) > accuracy
        p[flip] = rng.integers(0, 3, flip.sum())
        out.append(p)
    return np.stack(out)


@pytest.mark.parametrize("metric", stats.METRICS)
def test_point_equals_the_metric_module(metric):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    p = _preds(rng, y, 0.7)
    expected = np.mean([getattr(metrics, metric)(pi, y) for pi in p])
    assert stats.point(p, y, metric, 3) == pytest.approx(expected, abs=1e-12)


def test_intervals_cover_and_pair():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 2000)
    good, bad = _preds(rng, y, 0.8), _preds(rng, y, 0.7)
    draws = stats.Resamples.draw(len(y), 3, b=400)
    iv = stats.interval(good, y, "accuracy", draws, 3)
    assert iv.low < iv.estimate < iv.high and iv.high - iv.low < 0.06
    d = stats.difference(good, bad, y, "accuracy", draws, 3)
    assert d.excludes_zero and d.low > 0
    same = stats.difference(good, good, y, "accuracy", draws, 3)
    assert same.estimate == same.low == same.high == 0.0
    # a paired difference is tighter than the unpaired intervals suggest
    close = good.copy()
    close[:, :20] = (close[:, :20] + 1) % 3   # 1% of examples worse
    dd = stats.difference(good, close, y, "accuracy", draws, 3)
    a, b = iv, stats.interval(close, y, "accuracy", draws, 3)
    assert a.overlaps(b) and dd.excludes_zero


def test_tiers_never_rank_two_overlapping_intervals():
    I = stats.Interval

    def check(ivs, expected):
        tiers = stats.unranked_groups(ivs)
        assert tiers == expected
        for a, ta in zip(ivs, tiers):   # different tiers: the better one lies entirely above
            for b, tb in zip(ivs, tiers):
                if ta < tb:
                    assert not a.overlaps(b) and a.low > b.high

    # A chain (tweet_methods' LoRA, BitFit, LN tuning): BitFit overlaps both, so LN tuning
    # cannot be put below BitFit's tier although LoRA lies entirely above it.
    check([I(81.6, 80.4, 82.8), I(79.4, 78.1, 80.7), I(78.6, 77.3, 79.9), I(74.1, 72.6, 75.4),
           I(42.9, 41.4, 44.5)], [0, 0, 0, 1, 2])
    # A wide interval overlapping both groups joins them (else it would sit above one it overlaps).
    check([I(0.80, 0.78, 0.82), I(0.79, 0.77, 0.81), I(0.70, 0.68, 0.72), I(0.60, 0.50, 0.79)],
          [0, 0, 0, 0])
    check([I(0.80, 0.78, 0.82), I(0.79, 0.77, 0.81), I(0.70, 0.68, 0.72)], [0, 0, 1])
    check([], [])

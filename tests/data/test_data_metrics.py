"""Metrics against values computed by hand (comments show the arithmetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftjax.data import (
    accuracy, compute_metrics, f1, get_task, macro_f1, majority_rate, matthews_corrcoef, pearson,
    rankdata, spearman,
)

# 3-class example used twice below.
Y3 = [0, 0, 1, 1, 2, 2]
P3 = [0, 1, 1, 1, 2, 0]


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_binary_f1():
    # tp=2 (pos 0, 3), fp=1 (pos 1), fn=1 (pos 4): F1 = 2*2 / (2*2 + 1 + 1) = 4/6
    assert f1([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    assert f1([0, 0, 0], [1, 1, 0]) == 0.0  # no true positives
    assert f1([0, 0, 1], [1, 1, 0], positive=0) == 0.0


def test_macro_f1():
    # class 0: tp1 fp1 fn1 -> 2/4; class 1: tp2 fp1 fn0 -> 4/5; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(P3, Y3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # A class only in the predictions counts (as F1 = 0), like sklearn's default.
    assert macro_f1([0, 2], [0, 0]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_mcc_binary():
    # tp=3 tn=3 fp=1 fn=1: (3*3 - 1*1) / sqrt(4*4*4*4) = 8/16
    assert matthews_corrcoef([1, 1, 0, 0, 0, 1, 0, 1], [1, 1, 1, 0, 0, 0, 0, 1]) == pytest.approx(0.5)
    assert matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_mcc_multiclass_and_degenerate():
    # c=4 correct, s=6, pred counts (2,3,1), true counts (2,2,2):
    # (4*6 - (4+6+2)) / sqrt((36 - 14) * (36 - 12)) = 12 / sqrt(528)
    assert matthews_corrcoef(P3, Y3) == pytest.approx(12 / math.sqrt(528))
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictor


def test_pearson():
    # dx = (-1.5,-.5,.5,1.5), dy = (-3,-1,0,4): 11 / sqrt(5 * 26)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_rankdata_averages_ties():
    np.testing.assert_array_equal(rankdata([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(rankdata([3, 1, 3, 3, 2]), [4, 1, 4, 4, 2])
    np.testing.assert_array_equal(rankdata([5.0]), [1.0])


def test_spearman():
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert math.isnan(spearman([2, 2, 2], [1, 2, 3]))


def test_against_scipy_if_present():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)
    y = y + x
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))


def test_majority_rate():
    assert majority_rate([0, 0, 1, 2]) == 0.5
    assert majority_rate([1]) == 1.0


def test_compute_metrics_classification_from_ids_and_logits():
    task = get_task("tweet_sentiment")
    expected = {"accuracy": 4 / 6, "macro_f1": pytest.approx((0.5 + 0.8 + 2 / 3) / 3)}
    assert compute_metrics(task, P3, Y3) == expected
    logits = np.eye(3)[P3] * 5.0 - 1.0
    assert compute_metrics(task, logits, Y3) == expected
    assert list(compute_metrics(get_task("mrpc"), [1, 0], [1, 1])) == ["accuracy", "f1"]
    assert compute_metrics(get_task("cola"), [1, 0, 1, 0], [1, 0, 1, 0]) == {"mcc": pytest.approx(1.0)}


def test_compute_metrics_regression():
    out = compute_metrics(get_task("stsb"), np.array([[1.0], [2.0], [3.0], [4.0]]), [2.0, 4.0, 5.0, 9.0])
    assert out == {"pearson": pytest.approx(11 / math.sqrt(130)), "spearman": pytest.approx(1.0)}


def test_compute_metrics_rejects_bad_inputs():
    with pytest.raises(ValueError, match="unlabelled"):
        compute_metrics(get_task("sst2"), [0, 1], [-1, -1])
    with pytest.raises(ValueError, match="columns"):
        compute_metrics(get_task("sst2"), np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="differ in size"):
        accuracy([0, 1], [0])

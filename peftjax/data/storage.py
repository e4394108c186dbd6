"""Where prepared datasets live and how they are read, without TensorFlow.

Why array_record + `as_data_source()`: TFDS's default tfrecord format and `tfds.load` need
TensorFlow, which peftjax does not depend on. array_record files give random access (so
`limit=` and resumable batching are cheap) and are read with plain numpy decoding.

Data dir resolution (every public loader takes an optional `data_dir`):
  1. the `data_dir` argument, if given;
  2. `$PEFTJAX_DATA_DIR`;
  3. `~/.cache/peftjax/tensorflow_datasets`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import tensorflow_datasets as tfds

from peftjax.files import exclusive_lock

DATA_DIR_ENV = "PEFTJAX_DATA_DIR"
FILE_FORMAT = "array_record"
_READ_CHUNK = 8192


def default_data_dir(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Resolves the TFDS data dir (argument, then $PEFTJAX_DATA_DIR, then the cache dir)."""
    if data_dir is not None:
        return os.fspath(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), ".cache", "peftjax", "tensorflow_datasets")


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether `builder` is complete on disk (checked quietly: TFDS warns about missing folders)."""
    return os.path.exists(os.path.join(os.fspath(builder.data_path), "dataset_info.json")) and builder.is_prepared()


def prepare_once(make_builder: Callable[[], tfds.core.DatasetBuilder],
                 prepare: Callable[[tfds.core.DatasetBuilder], None]) -> tfds.core.DatasetBuilder:
    """Returns a prepared builder, preparing it at most once even with many processes at a time.

    Why a lock: the grid's workers (and pytest-xdist's) start together on a fresh machine; TFDS
    prepares into a temporary folder and renames it at the end, so two processes preparing the
    same dataset race and the second one's rename fails ("Destination ... already exists"),
    failing its cell. Under an exclusive lock in the data dir the first process prepares and
    the others wait, then read what it wrote. The builder is made again after the lock is held:
    one built before another process prepared the data has not read its dataset_info.
    """
    b = make_builder()
    if is_prepared(b):
        return b
    lock = os.path.join(os.fspath(b.data_dir_root), f".{b.name}.prepare.lock")
    with exclusive_lock(lock):
        b = make_builder()
        if not is_prepared(b):
            prepare(b)
    return b


def read_records(builder: tfds.core.DatasetBuilder, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Reads the first `limit` records (all if None) of a prepared builder's split.

    `split` may use TFDS slicing ("train[:10%]"). Records are raw TFDS dicts (text as bytes).
    Reads go through `__getitems__` in chunks: one random-access call per chunk rather than one
    per record.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    source = builder.as_data_source(split=split)
    n = len(source) if limit is None else min(limit, len(source))
    records: list[dict[str, Any]] = []
    for start in range(0, n, _READ_CHUNK):
        records.extend(source.__getitems__(list(range(start, min(n, start + _READ_CHUNK)))))
    return records

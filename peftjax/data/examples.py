"""The common example format every task is mapped to.

Why one format: tokenisation, batching and evaluation should not know which dataset an example
came from. A raw TFDS record (GLUE's `sentence1`/`question`/..., the tweets' `text`) is mapped to

    {'text_a': str, 'text_b': str | None, 'label': int | float, 'idx': int}

by `to_example`, a pure function of (task, record) so it can be tested without any data on disk.
`label` is an int class id for classification and a float for regression; GLUE test splits carry
no labels and keep TFDS's -1 (int) / -1.0 (float).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np

from peftjax.data.tasks import Task


class Example(TypedDict):
    """One example in the common format (a plain dict at runtime)."""

    text_a: str
    text_b: str | None
    label: int | float
    idx: int


def as_text(value: Any) -> str:
    """TFDS data sources return Text features as bytes; the format wants str."""
    if isinstance(value, np.ndarray):  # 0-d object arrays from some decoders
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a text feature (bytes or str), got {type(value).__name__}")


def to_example(task: Task, record: Mapping[str, Any]) -> Example:
    """Maps one raw TFDS record of `task`'s dataset to the common format.

    Args:
      task: decides which fields hold text_a/text_b and the label's Python type.
      record: a dict as returned by `builder.as_data_source()[split][i]` (or a generator's
        example before encoding): the task's text fields, 'label' and 'idx'.
    """
    missing = [k for k in (*task.text_fields, "label", "idx") if k not in record]
    if missing:
        raise KeyError(f"record for task {task.name} lacks fields {missing}; has {sorted(record)}")
    label = record["label"]
    label = float(label) if task.kind == "regression" else int(label)
    return Example(
        text_a=as_text(record[task.text_fields[0]]),
        text_b=as_text(record[task.text_fields[1]]) if task.is_pair else None,
        label=label,
        idx=int(record["idx"]),
    )

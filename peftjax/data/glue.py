"""GLUE through TFDS's own `glue/<config>` builders, stored as array_record.

Why TFDS's builders: they already encode GLUE's quirks (CoLA's header-less TSVs, MRPC assembled
from the MSR paraphrase files, MNLI's matched/mismatched splits, STS-B float scores); we only
change the storage format (array_record, readable without TensorFlow) and map records to the
common example format with `glue_to_example`, a pure function so it is testable offline.

The first `prepare` of a config downloads the GLUE files, so it needs the internet (and the
`importlib_resources` package, a TFDS glue requirement). TFDS retries a failed download for a few
minutes before raising; we re-raise with a hint. Prepared data is reused offline afterwards, and
a prepared data dir can be copied to an offline machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds
import tensorflow_datasets.text.glue  # noqa: F401  (registers the glue builders)

from peftjax.data import storage
from peftjax.data.examples import Example, to_example
from peftjax.data.tasks import Task, get_task

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")


def _glue_task(task: Task | str) -> Task:
    task = get_task(task) if isinstance(task, str) else task
    if task.tfds_name != "glue":
        raise ValueError(f"Task {task.name!r} is not a GLUE task (tfds_name={task.tfds_name!r})")
    return task


def glue_to_example(task: Task | str, record: Mapping[str, Any]) -> Example:
    """Maps one `glue/<config>` record to {'text_a', 'text_b', 'label', 'idx'}.

    Pure: depends only on its arguments. Text fields come from `task.text_fields` (e.g. MNLI's
    premise -> text_a, hypothesis -> text_b); test-split labels stay -1 (-1.0 for STS-B).
    """
    return to_example(_glue_task(task), record)


def builder(task: Task | str, data_dir: str | os.PathLike[str] | None = None) -> tfds.core.DatasetBuilder:
    """The (possibly unprepared) TFDS glue builder for `task`, set to write array_record."""
    task = _glue_task(task)
    return tfds.builder(
        f"glue/{task.tfds_config}",
        data_dir=storage.default_data_dir(data_dir),
        file_format=storage.FILE_FORMAT,
    )


def prepare(task: Task | str, data_dir: str | os.PathLike[str] | None = None) -> tfds.core.DatasetBuilder:
    """Downloads and prepares the GLUE config of `task` unless already on disk (needs internet once)."""
    def download(b: tfds.core.DatasetBuilder) -> None:
        try:
            b.download_and_prepare(file_format=storage.FILE_FORMAT)
        except Exception as e:  # connection errors come in many types (requests, urllib3, OSError)
            raise RuntimeError(
                f"Preparing {b.info.full_name} in {b.data_dir} failed. GLUE's first preparation downloads "
                "its files and needs the internet; on an offline machine copy a prepared data dir "
                f"(set ${storage.DATA_DIR_ENV})."
            ) from e

    return storage.prepare_once(lambda: builder(task, data_dir), download)

r"""Prints split sizes and label statistics of a task, preparing its data first if needed.

Why: before training, check what a model is up against: how big each split is, how balanced the
classes are, and the majority-class rate (the accuracy of a constant predictor), per split.

Usage, from the repository root:

    python scripts/describe_data.py --task=tweet_sentiment
    python scripts/describe_data.py --task=tweet_polarity --data_dir=/tmp/tfds
    python scripts/describe_data.py --task=sst2        # GLUE: the first run downloads

Output: a table, then one line `JSON: {...}` with the same numbers (machine-readable; grep for
the prefix). Tweet tasks are prepared offline; GLUE tasks need the internet once.
Regression tasks (stsb) show label mean/std/min/max instead of class counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

# Runnable as `python scripts/describe_data.py` before peftjax is pip-installed.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from peftjax import data  # noqa: E402

_TASK = flags.DEFINE_string("task", "tweet_sentiment", "Registered task name (see peftjax.data.list_tasks()).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, f"TFDS data dir; default ${data.DATA_DIR_ENV} or ~/.cache/peftjax.")


def describe(task_name: str, data_dir: str | None = None) -> dict[str, Any]:
    """Per-split statistics of a task: {'task', 'kind', 'splits': {split: {...}}}."""
    task = data.get_task(task_name)
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its "preparing" notice to stdout
        builder = data.prepare(task_name, data_dir)
    splits: dict[str, Any] = {}
    for split in builder.info.splits:
        labels = np.asarray([e["label"] for e in data.load_examples(task_name, split, data_dir)])
        stats: dict[str, Any] = {"size": int(labels.size)}
        if task.kind == "classification":
            labelled = labels[labels >= 0]
            counts = np.bincount(labelled, minlength=task.num_labels) if labelled.size else np.zeros(task.num_labels, int)
            stats["counts"] = {name: int(c) for name, c in zip(task.label_names, counts)}
            if labelled.size < labels.size:
                stats["unlabelled"] = int(labels.size - labelled.size)
            stats["majority_rate"] = round(data.majority_rate(labelled), 4) if labelled.size else None
        else:
            labelled = labels[labels >= 0]
            stats.update(
                {k: round(float(f(labelled)), 4) if labelled.size else None
                 for k, f in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))}
            )
            if labelled.size < labels.size:
                stats["unlabelled"] = int(labels.size - labelled.size)
        splits[split] = stats
    return {"task": task.name, "kind": task.kind, "splits": splits}


def format_table(summary: dict[str, Any]) -> str:
    """Fixed-width table: one row per split."""
    rows = summary["splits"]
    value_cols = sorted({k for s in rows.values() for k in s if k not in ("size", "counts")})
    count_cols = list(next(iter(rows.values())).get("counts", {})) if rows else []
    header = ["split", "size", *count_cols, *value_cols]
    lines = [header]
    for split, s in rows.items():
        counts = s.get("counts", {})
        lines.append([split, str(s["size"]), *(str(counts.get(c, "")) for c in count_cols),
                      *("" if s.get(c) is None else str(s[c]) for c in value_cols)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"task: {summary['task']} ({summary['kind']})"]
    for j, line in enumerate(lines):
        text.append("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _TASK.value not in data.list_tasks():
        raise app.UsageError(f"Unknown task {_TASK.value!r}; registered: {', '.join(data.list_tasks())}")
    if not flags.FLAGS["verbosity"].present:  # TFDS logs every info-file read at INFO.
        logging.set_verbosity(logging.WARNING)
    tfds.disable_progress_bar()  # keep stdout to the table and the JSON line
    summary = describe(_TASK.value, _DATA_DIR.value)
    print(format_table(summary))
    print("JSON: " + json.dumps(summary, sort_keys=False))


if __name__ == "__main__":
    app.run(main)

"""The main job (`make run`): the quickstart grid, resumable, with a report.

    python scripts/quickstart.py [--grid=experiments/quickstart/grid.py] [--out=runs/quickstart]

Each finished cell is appended to OUT/results.jsonl at once; a killed run, restarted, skips the
finished cells (and an interrupted cell resumes from its own checkpoints in OUT/cells/<method>).
Then OUT/report.md gets the table (method, trainable params, % of total, test accuracy,
macro-F1, step time, peak memory), which is also printed.
"""

import json
import os
import platform
import sys
import time

import _bootstrap
from absl import app, flags, logging
from ml_collections import config_flags

from peftjax.files import write_text_atomic

config_flags.DEFINE_config_file("grid", os.path.join(_bootstrap.ROOT, "experiments/quickstart/grid.py"),
                                "the grid definition")
flags.DEFINE_string("out", os.path.join(_bootstrap.ROOT, "runs/quickstart"), "output folder")
FLAGS = flags.FLAGS


def cell_config(grid, method: str):
    from configs.train import get_config

    config = get_config(f"model={grid.model},method={method},task={grid.task}")
    config.seed = grid.seed
    if grid.get("pooling"):  # "" keeps the model config's own
        config.model.pooling = grid.pooling
    for key, value in grid.train.items():
        config.train[key] = value
    for section, values in grid.overrides.get(method, {}).items():
        for key, value in values.items():
            config[section][key] = value
    return config


def report(rows, grid, elapsed: float | None) -> str:
    from peftjax.grid.report import human_bytes, markdown_table

    columns = [
        ("method", "method", str),
        ("trainable params", "trainable_params", lambda v: f"{v:,}"),
        ("% of total", "trainable_percent", lambda v: f"{v:.3f}%"),
        ("test accuracy", "metrics.test.accuracy", lambda v: f"{100 * v:.1f}"),
        ("test macro-F1", "metrics.test.macro_f1", lambda v: f"{100 * v:.1f}"),
        ("val accuracy", "metrics.validation.accuracy", lambda v: f"{100 * v:.1f}"),
        ("step time (s)", "step_time_s", lambda v: f"{v:.3f}"),
        ("peak memory", "peak_memory_bytes", human_bytes),
        ("cell time (s)", "cell_seconds", lambda v: f"{v:.0f}"),
    ]
    order = {m: i for i, m in enumerate(grid.methods)}
    rows = sorted(rows, key=lambda r: order.get(r["method"], 99))
    table = markdown_table(rows, columns)
    majority = rows[0].get("majority_rate") if rows else None
    t = grid.train
    import jax

    lines = [
        "# Quickstart: PEFT methods on all-MiniLM-L6-v2 x tweet_sentiment",
        "",
        f"Command: `make run` (= `python scripts/quickstart.py`). Seed {grid.seed}; "
        f"head pooling {rows[0].get('pooling') if rows else '?'}; "
        f"{t.steps} steps of batch {t.batch_size} (AdamW, linear decay, warmup {t.warmup_ratio:.0%}), "
        f"max length 64 tokens padded to buckets; validation/test on fixed {t.eval_limit}-tweet "
        "unbiased samples; test reported at the best validation step.",
        "",
        table,
        "",
        f"Majority-class rate on the test sample: {100 * majority:.1f}%." if majority is not None else "",
        "",
        f"Step time: median wall time of a training step after compilation "
        f"({jax.default_backend()}, {os.cpu_count()} cores, fp32). Peak memory: XLA's memory analysis "
        "of the compiled train step (arguments + outputs + temporaries - donated buffers).",
        f"Learning rates: " + ", ".join(
            f"{r['method']} {r['config']['train']['learning_rate']:g}" for r in rows) + ".",
        f"Wall time of this run: {elapsed:.0f} s." if elapsed is not None else "",
        f"Python {platform.python_version()}, jax {jax.__version__}.",
    ]
    return "\n".join(line for line in lines) + "\n"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from peftjax.grid import ResultsStore
    from peftjax.train import train_and_evaluate

    grid = FLAGS.grid
    out = FLAGS.out
    os.makedirs(out, exist_ok=True)
    store = ResultsStore(os.path.join(out, "results.jsonl"))
    start = time.time()
    for i, method in enumerate(grid.methods):
        if method in store.done():
            print(f"[{i + 1}/{len(grid.methods)}] {method}: done already, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(grid.methods)}] {method}", flush=True)
        t0 = time.time()
        result = train_and_evaluate(cell_config(grid, method), os.path.join(out, "cells", method))
        result["cell"] = method
        result["cell_seconds"] = time.time() - t0
        store.append(result)
    text = report(store.read(), grid, time.time() - start)
    write_text_atomic(os.path.join(out, "report.md"), text)
    print(text)
    print(f"results: {store.path}\nreport:  {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
    _bootstrap.run(main)

"""Expand a sweep definition into cells and run them (resumably).

    python scripts/sweep.py --config=experiments/tweet_methods/grid.py --workdir=runs/tweet_methods --dry_run
    python scripts/sweep.py --config=experiments/tweet_methods/grid.py --workdir=runs/tweet_methods [--workers=2]
    python scripts/report.py runs/tweet_methods

``--dry_run`` lists the cells (id = hash of the resolved config, label) with their count and, if
WORKDIR has results, each cell's status; nothing is trained. A run skips finished cells, records
a failing cell's error and traceback and goes on (``--retry_failed`` reruns failures), and a
killed run, restarted, resumes the interrupted cell from its checkpoints. The whole definition is
validated before any cell runs: an unknown model, task, method or config key is an error naming
the cell and the field. See peftjax/grid/sweep.py for the definition format. Cells share
WORKDIR/jax_cache (compiled programs) and WORKDIR/cache (a method's data pass, such as
Child-tuning_D's Fisher estimate over the training set: made once for all learning rates).

``--adopt_from=DIR`` first copies in the finished cells of another sweep folder that are cells of
this one (the same resolved config, so the same id: a convergence check's long run is a cell of
a grid at that budget).

``--only=REGEX`` runs (or lists) only the cells whose label matches, e.g.
``--only='/(full|lora)\['`` to settle two variants' selections before the rest; the others stay
pending for a later run without it.
"""

import json
import os
import sys

import _bootstrap  # noqa: F401
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "the sweep definition (experiments/<name>/grid.py)",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "the sweep's folder: results.jsonl, cells/<id>/, stamps")
flags.DEFINE_bool("dry_run", False, "list the cells and their count; run nothing")
flags.DEFINE_integer("workers", 1, "cells run at once, each worker a separate process (1: in this process)")
flags.DEFINE_string("only", None, "a regular expression: run (or list) only the cells whose label "
                    "(model/task/variant[hp]/seed=N) it matches; the rest stay pending")
flags.DEFINE_string("adopt_from", None, "another sweep folder: its finished cells that are cells of this "
                    "sweep (same resolved config, same id) are copied into this one's store first")
flags.DEFINE_bool("retry_failed", False, "rerun cells whose last attempt failed (from scratch)")
flags.DEFINE_string("cell_fn", "peftjax.grid.runner:train_cell",
                    "module:function run for each cell as fn(cell, celldir) -> result dict")
flags.DEFINE_bool("progress", True, "progress bars")
flags.DEFINE_bool("compile_cache", True, "JAX's persistent compilation cache in WORKDIR/jax_cache, "
                  "shared by the cells (a cell reuses the programs an earlier one compiled)")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _results(workdir: str | None) -> list[dict]:
    from peftjax.grid import ResultsStore

    path = os.path.join(workdir, "results.jsonl") if workdir else ""
    return ResultsStore(path).read() if path and os.path.exists(path) else []


def _cells() -> tuple[list, list]:
    """(cells to run now, cells deferred until a selection) of the definition, given the results
    so far, as --only selects them."""
    from peftjax.grid import sweep

    return sweep.select(FLAGS.only, *sweep.expand_with_selection(FLAGS.config, _results(FLAGS.workdir)))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from peftjax.grid import runner, sweep

    try:
        cells, deferred = _cells()
    except sweep.GridError as e:
        print(f"error: invalid sweep definition: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # --only
        print(f"error: {e}", file=sys.stderr)
        return 2
    will_run = len({(c.model, c.task, c.variant, c.seed) for c in deferred})
    waiting = (f"; then {will_run} more, at the value each variant's selection on selection_seeds "
               f"chooses (of {len(deferred)} candidates)" if deferred else "")
    if FLAGS.dry_run:
        if FLAGS.workdir and os.path.exists(os.path.join(FLAGS.workdir, "results.jsonl")):
            state = runner.status(cells, FLAGS.workdir)
            # A diverged run is failed for the runner (not rerun) but a lost grid value for the
            # selection: listed as such.
            lost = sweep.diverged_ids(_results(FLAGS.workdir))
            state = {cid: "diverged" if cid in lost and s == "failed" else s for cid, s in state.items()}
            for c in cells:
                print(f"{c.id}  {state[c.id]:<8}  {c.label}")
            counts = {s: list(state.values()).count(s) for s in ("ok", "diverged", "failed", "pending")}
            counts = {k: v for k, v in counts.items() if v or k != "diverged"}
            print(f"{len(cells)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + waiting)
        else:
            print(sweep.describe(cells) + waiting)
        return 0
    if not FLAGS.workdir:
        print("error: --workdir is required to run the sweep", file=sys.stderr)
        return 2
    definition = sweep._plain(FLAGS.config)
    if FLAGS.adopt_from:
        for cell in runner.adopt(sweep.expand(FLAGS.config), FLAGS.workdir, FLAGS.adopt_from):
            print(f"adopted from {FLAGS.adopt_from}: {cell.label}")
        cells, deferred = _cells()
    # After every finished cell the sweep is re-expanded on the results so far: a variant whose
    # selection just finished has its other seeds queued at once, ahead of later variants.
    counts = runner.run(cells, FLAGS.workdir, workers=FLAGS.workers, retry_failed=FLAGS.retry_failed,
                        cell_fn=FLAGS.cell_fn, definition=definition, progress=FLAGS.progress,
                        compile_cache=FLAGS.compile_cache, more=lambda: _cells()[0])
    print(json.dumps(counts))
    _, deferred = _cells()
    if deferred:
        print(f"{len(deferred)} cells still wait for a selection (its cells failed?): "
              + ", ".join(c.label for c in deferred[:5]), file=sys.stderr)
    print(f"results: {os.path.join(FLAGS.workdir, 'results.jsonl')}\n"
          f"report:  python scripts/report.py {FLAGS.workdir}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

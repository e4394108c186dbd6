"""Sweep throughput, before/after: the same cells with and without the throughput settings.

    python scripts/bench_sweep.py --config=experiments/tweet_methods/grid.py \\
        --only='tweet_sentiment/(lora|bitfit)\\[.*seed=0' --limit=4 --workers=2 --workdir=/tmp/bench_sweep

Runs the first ``--limit`` cells of the definition that ``--only`` selects twice, each time in a
fresh folder under ``--workdir``:

* **before**: the definition with ``--before`` applied over every cell (default: no length
  grouping, batches padded to powers of two) and no persistent compilation cache — a sweep as it
  ran before those features;
* **after**: the definition with ``--after`` applied over every cell (default: nothing, the
  definition as written), with the sweep's compilation cache (empty at the start, so filling it
  is paid for).

``--after`` lets a definition written before the throughput settings existed be measured with
them on, so that "the same definition, before and after" holds for an old grid too, e.g. the
40-step tweet_methods that issue 18 called "today"::

    git show 58864fa:experiments/tweet_methods/grid.py > /tmp/grid_40step.py
    python scripts/bench_sweep.py --config=/tmp/grid_40step.py --only='tweet_sentiment/(full|lora|bitfit)/' \\
        --limit=9 --workers=2 --workdir=/tmp/bench_40step \\
        --after='{"train": {"group_by_length": 50, "bucket_multiple": 8}}'

For each side it prints cells, wall time and cells per hour, the mean seconds per cell, the
fixed overhead per cell (cell seconds − steps × steady step time: set-up, compilation,
evaluation), the steady step time, and the padding fraction of training batches and of the
validation split; then the after/before ratio of cells per hour. Time it on quiet cores (no
test suite or sweep beside it): the figures are only comparable within one run of this script.
A JSON copy goes to WORKDIR/bench_sweep.json.
"""

import copy
import json
import os
import sys
import time

import _bootstrap  # noqa: F401
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "the sweep definition (experiments/<name>/grid.py)",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "an empty or new folder for the two sides' sweeps")
flags.DEFINE_string("only", "", "a regular expression over cell labels (as scripts/sweep.py --only)")
flags.DEFINE_integer("limit", 4, "cells per side (the first that --only selects)")
flags.DEFINE_integer("workers", 2, "cells run at once (as scripts/sweep.py --workers)")
flags.DEFINE_string("before", '{"train": {"group_by_length": 0, "bucket_multiple": 0}}',
                    "JSON {section: {key: value}} applied over every cell for the 'before' side")
flags.DEFINE_string("after", "{}", "JSON {section: {key: value}} applied over every cell for the "
                    "'after' side ({}: the definition as written)")
flags.DEFINE_string("cell_fn", "peftjax.grid.runner:train_cell", "as scripts/sweep.py --cell_fn")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _overridden(cell, overrides: dict, flag: str):
    """The cell with ``overrides`` set in its resolved config (and the id that config hashes to)."""
    import dataclasses

    from peftjax.grid import sweep

    config = copy.deepcopy(cell.config)
    for section, values in overrides.items():
        for key, value in values.items():
            if key not in config.get(section, {}):
                raise ValueError(f"{flag}: {section}.{key} is not a key of the train config")
            config[section][key] = value
    return dataclasses.replace(cell, config=config, id=sweep.cell_id(config, cell.rank_sweep))


def _parsed_overrides(flag: str) -> dict:
    """``--before``'s or ``--after``'s JSON, its train keys checked against configs/train.py's
    before the definition is expanded (building its models takes seconds; a typo should not)."""
    from configs.train import train_defaults

    overrides = json.loads(getattr(FLAGS, flag.lstrip("-")))
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f"{flag} must be a JSON object of sections, e.g. "
                         f'{{"train": {{"bucket_multiple": 0}}}}; got {overrides!r}')
    valid = train_defaults()
    unknown = sorted(set(overrides.get("train", {})) - set(valid))
    if unknown:
        raise ValueError(f"{flag}: {', '.join('train.' + k for k in unknown)} is not a key of the "
                         f"train config; valid: {', '.join(sorted(valid))}")
    return overrides


def _side(name: str, cells, workdir: str, compile_cache: bool, definition: dict) -> dict:
    from peftjax.grid import ResultsStore, runner

    start = time.perf_counter()
    counts = runner.run(cells, workdir, workers=FLAGS.workers, cell_fn=FLAGS.cell_fn,
                        definition=definition, progress=False, compile_cache=compile_cache)
    wall = time.perf_counter() - start
    rows = [r for r in ResultsStore(os.path.join(workdir, "results.jsonl")).read() if r.get("status") == "ok"]
    if counts.get("failed"):
        raise RuntimeError(f"{name}: {counts['failed']} cells failed; see {workdir}/results.jsonl")

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    steady = [r.get("step_time_s") for r in rows]
    return {"side": name, "cells": len(rows), "wall_s": wall, "cells_per_hour": 3600 * len(rows) / wall,
            "cell_s": mean([r.get("cell_seconds") for r in rows]),
            "overhead_s": mean([r["cell_seconds"] - r["steps"] * r["step_time_s"] for r in rows
                                if r.get("cell_seconds") and r.get("steps") and r.get("step_time_s")]),
            "step_time_s": mean(steady),
            "padding_train": mean([(r.get("padding_fraction") or {}).get("train") for r in rows]),
            "padding_validation": mean([(r.get("padding_fraction") or {}).get("validation") for r in rows]),
            "compile_cache": compile_cache}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from peftjax.files import write_json_atomic
    from peftjax.grid import sweep

    if os.path.isdir(FLAGS.workdir) and os.listdir(FLAGS.workdir):
        print(f"error: --workdir={FLAGS.workdir} is not empty; the two sides must start from "
              "nothing (no results, no compilation cache)", file=sys.stderr)
        return 2
    try:
        before, after = _parsed_overrides("--before"), _parsed_overrides("--after")
        cells = sweep.select(FLAGS.only, sweep.expand(FLAGS.config))[0][:FLAGS.limit]
        before_cells = [_overridden(c, before, "--before") for c in cells]
        after_cells = [_overridden(c, after, "--after") for c in cells]
    except (ValueError, sweep.GridError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    definition = sweep._plain(FLAGS.config)
    print(f"{len(cells)} cells per side, {FLAGS.workers} workers:\n  " + "\n  ".join(c.label for c in cells))
    sides = [_side("before", before_cells, os.path.join(FLAGS.workdir, "before"), False, definition),
             _side("after", after_cells, os.path.join(FLAGS.workdir, "after"), True, definition)]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    print(f"{'side':<7} {'cells':>5} {'wall s':>8} {'cells/h':>8} {'s/cell':>7} {'overhead s':>10} "
          f"{'step s':>7} {'pad train':>9} {'pad val':>8}")
    for s in sides:
        print(f"{s['side']:<7} {s['cells']:>5} {s['wall_s']:>8.1f} {s['cells_per_hour']:>8.2f} "
              f"{fmt(s['cell_s'], '7.1f')} {fmt(s['overhead_s'], '10.1f')} {fmt(s['step_time_s'], '7.3f')} "
              f"{fmt(s['padding_train'], '9.3f')} {fmt(s['padding_validation'], '8.3f')}")
    ratio = sides[1]["cells_per_hour"] / sides[0]["cells_per_hour"]
    print(f"after/before: {ratio:.2f}x cells per hour")
    write_json_atomic(os.path.join(FLAGS.workdir, "bench_sweep.json"),
                      {"sides": sides, "ratio": ratio, "cells": [c.label for c in cells],
                       "before_overrides": before, "after_overrides": after,
                       "workers": FLAGS.workers}, indent=1)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

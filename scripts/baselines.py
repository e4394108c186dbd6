"""Add the honest baselines (majority class; bag-of-words Naive Bayes on the whole training split,
α chosen on validation) to a sweep's results, for every (model, task) of its definition.

    python scripts/baselines.py --config=experiments/tweet_methods/grid.py --workdir=runs/tweet_methods
    python scripts/report.py runs/tweet_methods

Rows already in WORKDIR/results.jsonl are skipped; the report then shows the baselines as
variants (``majority``, ``bag_of_words``) with intervals like any method (peftjax/grid/baselines.py).
"""

import os

import _bootstrap
from absl import flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "the sweep definition (experiments/<name>/grid.py)",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "the sweep's folder (results.jsonl)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import ml_collections

    from peftjax.grid import ResultsStore, baselines, sweep

    cells = sweep.expand(FLAGS.config)
    firsts = {}
    for c in cells:
        firsts.setdefault((c.model, c.task), c)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    store = ResultsStore(os.path.join(FLAGS.workdir, "results.jsonl"))
    # A row is redone when its selection metric changed (the latest line of a cell wins).
    have = {(r.get("cell"), r.get("primary_metric")) for r in store.read()}
    for (model, task), cell in firsts.items():
        rows = baselines.baseline_rows(ml_collections.ConfigDict(cell.config))
        new = [r for r in rows if (r["cell"], r["primary_metric"]) not in have]
        for r in new:
            store.append(r)
        best = max((r for r in rows if r["variant"] == "bag_of_words"),
                   key=lambda r: r["metrics"]["validation"][r["primary_metric"]])
        print(f"{model} × {task}: majority test accuracy "
              f"{100 * rows[0]['metrics']['test']['accuracy']:.1f}; bag-of-words (alpha "
              f"{best['hp']['nb.alpha']:g}, chosen on validation {best['primary_metric']}) test accuracy "
              f"{100 * best['metrics']['test']['accuracy']:.1f}, macro-F1 "
              f"{100 * best['metrics']['test']['macro_f1']:.1f}; {len(new)} rows added")


if __name__ == "__main__":
    _bootstrap.run(main)

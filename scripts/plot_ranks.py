"""Plot AdaLoRA's final rank allocation of a finished run as a heat map (PNG + PDF).

    python scripts/plot_ranks.py --workdir=runs/adalora

reads WORKDIR/result.json (``rank_allocation``; ``adalora_ranks`` in runs of peftjax before 2026-12) and writes WORKDIR/rank_allocation.{png,pdf}.
"""

import json
import os

import _bootstrap
from absl import app, flags

flags.DEFINE_string("workdir", None, "a finished adalora run (with result.json)")
flags.DEFINE_string("out", "", "output path stem (default WORKDIR/rank_allocation)")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from peftjax.grid.plots import rank_allocation_heatmap

    path = os.path.join(FLAGS.workdir, "result.json")
    with open(path) as f:
        result = json.load(f)
    ranks = result.get("rank_allocation", result.get("adalora_ranks"))  # the older key too
    if ranks is None:
        raise ValueError(f"{path} has no rank_allocation: its method ({result.get('method')!r}) "
                         "does not report one (AdaLoRA does)")
    target = result.get("rank_budget", result.get("adalora_budget", {})).get("target")
    title = (f"{result['method']} ranks, {result['model']} on {result['task']} "
             f"(total {sum(ranks.values())}, budget {target})")
    for p in rank_allocation_heatmap(ranks, FLAGS.out or os.path.join(
            FLAGS.workdir, "rank_allocation"), title):
        print(p)


if __name__ == "__main__":
    _bootstrap.run(main)

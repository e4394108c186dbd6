"""Plot AdaLoRA's final rank allocation of a finished run as a heat map (PNG + PDF).

    python scripts/plot_ranks.py --workdir=runs/adalora

reads WORKDIR/result.json (``adalora_ranks``) and writes WORKDIR/rank_allocation.{png,pdf}.
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
    if "adalora_ranks" not in result:
        raise SystemExit(f"{path} has no adalora_ranks: was it an adalora run? (method: "
                         f"{result.get('method')!r})")
    title = (f"AdaLoRA ranks, {result['model']} on {result['task']} "
             f"(total {result['adalora_total_rank']}, budget {result['adalora_budget']['target']})")
    for p in rank_allocation_heatmap(result["adalora_ranks"], FLAGS.out or os.path.join(
            FLAGS.workdir, "rank_allocation"), title):
        print(p)


if __name__ == "__main__":
    _bootstrap.run(main)

"""A few-minute smoke version of tweet_methods (same settings, fewer cells and steps): LoRA at two
ranks (so selection on validation and the rank ablation have something to choose from) and
BitFit, one seed, 20 steps, on both tasks. It checks the whole pipeline end to end and times
a cell before the full grid is started.

    python scripts/sweep.py --config=experiments/tweet_methods/smoke.py --workdir=runs/tweet_methods_smoke
    python scripts/report.py runs/tweet_methods_smoke
"""

import importlib.util
import os

STEPS = 20


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grid.py")
    spec = importlib.util.spec_from_file_location("tweet_methods_grid", path)
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    c = grid.get_config()
    c.name = "tweet_methods_smoke"
    c.description = "Smoke version of tweet_methods: lora (ranks 4, 8) and bitfit, 1 seed, 20 steps."
    c.seeds = [0]
    c.base.train.steps = STEPS
    c.base.train.train_limit = STEPS * grid.BATCH
    c.base.train.eval_every = 10
    c.base.train.checkpoint_every = 10
    keep = {"lora", "bitfit"}
    for name in [v for v in c.variants if v not in keep]:
        del c.variants[name]
    c.variants.lora.grid = {"method": {"rank": [4, 8]}}
    c.report.order = [v for v in c.report.order if v in keep]
    return c

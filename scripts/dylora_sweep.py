"""Evaluate a finished DyLoRA run at several ranks, without retraining (DyLoRA's rank sweep).

    python scripts/dylora_sweep.py --workdir=runs/dylora --ranks=1,2,4,8

Restores the best trainable tree from ``WORKDIR/checkpoints`` (the one the run tested), rebuilds
the model and data from ``WORKDIR/result.json``'s config, evaluates validation and test with
``eval_rank`` = each rank, prints one JSON object and writes it to ``WORKDIR/rank_sweep.json``.
"""

import json
import os

import _bootstrap
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "workdir of a finished dylora run (result.json, checkpoints/)")
flags.DEFINE_list("ranks", ["1", "2", "4", "8"], "ranks to evaluate, each in 1..r_max")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def sweep(workdir: str, ranks: list[int]) -> dict:
    import jax

    from peftjax import methods
    from peftjax.files import write_json_atomic
    from peftjax.train import load_run
    from peftjax.train.loop import encode_splits, evaluate
    from peftjax.train.steps import make_eval_step

    run = load_run(workdir)
    field = run.method.eval_rank_field
    if field is None:
        raise ValueError(f"{workdir} is a {run.method.name!r} run, which cannot be evaluated at "
                         "other ranks without retraining (DyLoRA can)")
    encoded = encode_splits(run.config, run.task, run.tokenizer)
    lm_classes = run.task.num_labels if "class_labels" in encoded["test"] else 0
    method_cfg = {k: v for k, v in run.config.method.to_dict().items() if k != "name"}
    out = {"workdir": workdir, "r_max": run.method.config.rank, "best_step": run.result["best_step"],
           "ranks": {}}
    for r in ranks:
        m = methods.create(run.method.name, run.model, {**method_cfg, field: r}, sites=run.method.sites)
        eval_fn = jax.jit(make_eval_step(m, lm_classes))
        out["ranks"][str(r)] = {
            split: evaluate(eval_fn, run.trainable, run.frozen, run.state, encoded[split],
                            run.config.train.eval_batch_size, run.task,
                            run.config.train.get("bucket_multiple", 0))
            for split in ("validation", "test")}
    write_json_atomic(os.path.join(workdir, "rank_sweep.json"), out)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print(json.dumps(sweep(FLAGS.workdir, [int(r) for r in FLAGS.ranks]), indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)

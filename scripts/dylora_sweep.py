"""Evaluate a finished DyLoRA run at several ranks, without retraining (DyLoRA's rank sweep).

    python scripts/dylora_sweep.py --workdir=runs/dylora --ranks=1,2,4,8

Restores the best trainable tree from ``WORKDIR/checkpoints`` (the one the run tested), rebuilds
the model and data from ``WORKDIR/result.json``'s config, evaluates validation and test with
``eval_rank`` = each rank, prints one JSON object and writes it to ``WORKDIR/rank_sweep.json``.
"""

import json
import os

import _bootstrap  # noqa: F401
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "workdir of a finished dylora run (result.json, checkpoints/)")
flags.DEFINE_list("ranks", ["1", "2", "4", "8"], "ranks to evaluate, each in 1..r_max")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def sweep(workdir: str, ranks: list[int]) -> dict:
    import jax
    import ml_collections

    from peftjax import methods
    from peftjax.train import loop
    from peftjax.train.checkpoint import Checkpointer
    from peftjax.train.optim import make_optimizer
    from peftjax.train.steps import init_state, make_eval_step

    with open(os.path.join(workdir, "result.json")) as f:
        config = ml_collections.ConfigDict(json.load(f)["config"])
    task, model, tokenizer, method, base = loop.build(config)
    if method.name != "dylora":
        raise ValueError(f"{workdir} is a {method.name!r} run; the rank sweep needs a dylora run")
    limits = loop.split_limits(config.train)
    splits = dict(zip(("train", "validation", "test"), task.splits))
    encoded = {k: loop.encode_split(config, task, tokenizer, splits[k], limits[k], for_eval=True)
               for k in ("validation", "test")}
    lm_classes = task.num_labels if "class_labels" in encoded["test"] else 0

    peft = method.setup(jax.random.PRNGKey(config.seed + 1), base, methods.InitContext(tokenizer=tokenizer))
    tx, _ = make_optimizer(config.train, config.train.steps, method.gradient_transform())
    template = {"state": init_state(peft.trainable, peft.state, tx),
                "best": loop._best_tree({"trainable": peft.trainable, "metrics": None, "step": 0},
                                        loop._metric_names(task))}
    restored = Checkpointer(os.path.join(workdir, "checkpoints")).restore(template)
    best = loop._best_from_tree(restored["best"])
    trainable = best["trainable"] if best["step"] > 0 else restored["state"][1]

    method_cfg = {k: v for k, v in config.method.to_dict().items() if k != "name"}
    out = {"workdir": workdir, "r_max": method.config.rank, "best_step": best["step"], "ranks": {}}
    for r in ranks:
        m = methods.create("dylora", model, {**method_cfg, "eval_rank": r}, sites=method.sites)
        eval_fn = jax.jit(make_eval_step(m, lm_classes))
        out["ranks"][str(r)] = {
            split: loop.evaluate(eval_fn, trainable, peft.frozen, peft.state, encoded[split],
                                 config.train.eval_batch_size, task)
            for split in ("validation", "test")}
    loop.write_json_atomic(os.path.join(workdir, "rank_sweep.json"), out)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    print(json.dumps(sweep(FLAGS.workdir, [int(r) for r in FLAGS.ranks]), indent=2))


if __name__ == "__main__":
    app.run(main)

"""Train one method on one task and write ``WORKDIR/result.json``.

    python scripts/train.py \
      --config=configs/train.py:model=all-MiniLM-L6-v2,method=lora,task=tweet_sentiment \
      --config.method.rank=16 --workdir=runs/lora

Resumes from ``WORKDIR/checkpoints`` when present. Writes ``metrics.jsonl``, TensorBoard
events (``WORKDIR/tensorboard``), and ``result.json`` (method, model, task, trainable_params,
head_params, total_params, metrics.validation / metrics.test, step_time_s, peak_memory_bytes).
``--cache_dir=DIR`` keeps a method's data pass (Child-tuning_D's and FishMask's Fisher estimate)
there, so that runs on the same model, seed and data (other learning rates, a resumed run) read
it instead of repeating it (``peftjax/methods/pass_cache.py``).
"""

import json

import _bootstrap
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/train.py:model=...,method=...,task=...",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and result.json go")
flags.DEFINE_string("cache_dir", None, "where a method's data pass (a Fisher estimate) is kept "
                    "for runs that would repeat it; default: computed every time")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from peftjax.train import train_and_evaluate

    result = train_and_evaluate(FLAGS.config, FLAGS.workdir, cache_dir=FLAGS.cache_dir)
    summary = {k: result[k] for k in ("method", "model", "task", "trainable_params", "head_params",
                                      "total_params", "step_time_s", "peak_memory_bytes")}
    summary["metrics"] = result["metrics"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)

"""Count a method's parameters on abstract shapes: no weights, no allocation (7B in seconds).

    python scripts/count_params.py \
      --config=configs/train.py:model=roberta-base,method=lora \
      --config.method.rank=8 --config.method.targets='query|value'

prints one JSON object: ``trainable_params`` (what the method trains, task head excluded, as
papers count), ``head_params`` (the task head, always trained, reported apart) and
``total_params`` (base + head + added). Expected: 294912 for the command above.
"""

import json

import _bootstrap
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/train.py:model=...,method=...",
                                lock_config=True)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from peftjax import methods
    from peftjax.train.compose import build

    config = FLAGS.config
    task, model, _, method, _ = build(config, with_weights=False, with_tokenizer=False)
    counts = methods.count_params(method)
    out = {"method": method.name, "model": config.model.name, "task": task.name, "head": model.head,
           **counts,
           "trainable_percent": round(100.0 * counts["trainable_params"] / counts["total_params"], 4)}
    # e.g. FishMask: whether the head is in the budget; prefix tuning: params updated in training
    out.update(method.accounting())
    print(json.dumps(out))


if __name__ == "__main__":
    _bootstrap.run(main)

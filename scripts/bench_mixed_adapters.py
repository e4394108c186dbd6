"""Mixed-adapter batches against one batch per adapter: throughput of serving N LoRA adapters.

    python scripts/bench_mixed_adapters.py --model=all-MiniLM-L6-v2 --adapters=8 --batch=64 --seq=64

Builds N random rank-8 LoRA adapters (query/value) with their own classification heads in one
``peftjax.adapters.AdapterSet``, then times (a) one batch of ``batch`` rows whose rows use the N
adapters round-robin (one compiled forward, ``AdapterSet.apply(batch, names_per_row)``) and (b)
the same rows served as N separate batches of ``batch / N`` rows, one adapter each. Prints JSON
with both times and rows per second (medians of ``--repeats`` after a warm-up).
"""

import json

import _bootstrap
from absl import flags, logging

flags.DEFINE_string("model", "all-MiniLM-L6-v2", "model name or checkpoint folder")
flags.DEFINE_integer("adapters", 8, "number of adapters")
flags.DEFINE_integer("batch", 64, "rows per mixed batch")
flags.DEFINE_integer("seq", 64, "tokens per row")
flags.DEFINE_integer("rank", 8, "LoRA rank")
flags.DEFINE_integer("repeats", 10, "timed calls")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from configs import models
    from peftjax.adapters import AdapterSet
    from peftjax.methods import core
    from peftjax.models import hf_io
    from peftjax.train import measure

    if FLAGS.batch % FLAGS.adapters:
        raise ValueError(f"--batch={FLAGS.batch} must divide into --adapters={FLAGS.adapters} equal batches")
    model, params, _ = hf_io.load_from_config(models.get(FLAGS.model), head="classification", num_labels=3,
                                              with_tokenizer=False)
    flat = hf_io.flatten(params)
    aset = AdapterSet(model, flat)
    rng = np.random.default_rng(0)
    for i in range(FLAGS.adapters):
        method = core.create("lora", model, {"rank": FLAGS.rank, "alpha": 16.0})
        p = method.setup(jax.random.PRNGKey(i), flat)
        added = {k: v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for k, v in p.trainable["added"].items()}
        head = {k: v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for k, v in p.trainable["head"].items()}
        aset.add(f"task{i}", method, {"base": {}, "added": added, "head": head})
    ids = rng.integers(1000, 20000, size=(FLAGS.batch, FLAGS.seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    names = [f"task{i % FLAGS.adapters}" for i in range(FLAGS.batch)]
    per = FLAGS.batch // FLAGS.adapters
    parts = [({k: v[[r for r in range(FLAGS.batch) if r % FLAGS.adapters == i]] for k, v in batch.items()},
              f"task{i}") for i in range(FLAGS.adapters)]

    def mixed():
        jax.block_until_ready(aset.apply(batch, names))

    def separate():
        for sub, name in parts:
            jax.block_until_ready(aset.apply(sub, name))

    t_mixed = measure.median(measure.time_calls(mixed, FLAGS.repeats, 2))
    t_sep = measure.median(measure.time_calls(separate, FLAGS.repeats, 2))
    print(json.dumps({"model": FLAGS.model, "adapters": FLAGS.adapters, "batch": FLAGS.batch,
                      "seq": FLAGS.seq, "rows_per_separate_batch": per,
                      "mixed_batch_s": t_mixed, "separate_batches_s": t_sep,
                      "mixed_rows_per_s": FLAGS.batch / t_mixed, "separate_rows_per_s": FLAGS.batch / t_sep,
                      "speedup": t_sep / t_mixed, "backend": jax.default_backend()}, indent=1))


if __name__ == "__main__":
    _bootstrap.run(main)

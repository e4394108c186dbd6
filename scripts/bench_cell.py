"""Where one sweep cell's time goes: its train step and its whole-split validation, measured.

    python scripts/bench_cell.py --config=experiments/tweet_methods/grid.py \
        --cell='tweet_sentiment/lora[learning_rate=0.001]/seed=0'

builds the cell exactly as the sweep does (its resolved config, data, method and optimizer), then
prints one JSON object:

* ``train``: ``--steps`` steps on the cell's own (length-grouped, bucketed) batches after each
  batch shape's compilation and one untimed call; ``step_s`` (median), ``tokens_per_s`` (padded
  tokens the steps read per second), ``gflops_per_s`` (XLA's cost analysis of each shape's
  compiled step, summed over the timed steps, over their time), ``compile_s`` and ``shapes``.
* ``validation``: one pass over the whole validation split as the loop runs it (``loop.evaluate``,
  the cell's ``eval_batch_size`` and buckets), timed on a second pass (``first_pass_s``: the
  first, which may pay compilation); ``seconds``, ``padded_tokens``, ``tokens_per_s`` and
  ``gflops_per_s``.
* ``cell_estimate_s``: steps × step_s + evaluations × validation seconds (compilation, set-up and
  the test pass left out): what the budget costs on this machine, for one cell alone.

Nothing is written. A grid's cost is mostly these two numbers times its cells, so this is the tool
for asking whether a cell can get cheaper (issue 18's throughput notes use it).
"""

import json
import statistics
import time

import _bootstrap
from absl import flags, logging

flags.DEFINE_string("config", None, "a sweep definition (experiments/<name>/grid.py)")
flags.DEFINE_string("cell", None, "a substring of one cell's label (as `sweep.py --dry_run` lists them)")
flags.DEFINE_integer("steps", 20, "timed train steps")
flags.mark_flags_as_required(["config", "cell"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import ml_collections

    from peftjax import data as data_lib
    from peftjax import host
    from peftjax.grid import sweep
    from peftjax.train import loop, measure
    from peftjax.train.steps import make_eval_step, make_train_step

    cell = sweep.find_cell(sweep.expand(sweep.load_definition(FLAGS.config)), FLAGS.cell)
    config = ml_collections.ConfigDict(cell.config)
    tc = config.train
    machine = host.describe()   # the CPU and its matmul rate, before the cell is in memory
    t0 = time.perf_counter()
    run = loop.prepare(config)   # the run's own set-up: model, data, method, optimizer, placement
    task, encoded, method, placement = run.task, run.encoded, run.method, run.placement
    state, frozen = run.state, run.frozen
    setup_s = time.perf_counter() - t0

    train_step = placement.jit_train_step(make_train_step(method, run.tx))
    batches = data_lib.train_batches(encoded["train"], tc.batch_size, config.seed,
                                     group_by_length=tc.group_by_length, bucket_multiple=tc.bucket_multiple)
    compiled, flops, compile_s = {}, {}, 0.0
    times, done_flops, tokens = [], 0.0, 0
    while len(times) < FLAGS.steps:
        batch = placement.put_batch(next(batches))
        shape = batch["input_ids"].shape
        if shape not in compiled:   # compile, then one untimed call (first-call allocations)
            t = time.perf_counter()
            compiled[shape] = train_step.lower(state, frozen, batch).compile()
            compile_s += time.perf_counter() - t
            flops[shape] = measure.cost_analysis(compiled[shape]).get("flops", 0.0)
            state, m = compiled[shape](state, frozen, batch)
            float(m["loss"])
            continue
        t = time.perf_counter()
        state, m = compiled[shape](state, frozen, batch)
        float(m["loss"])   # blocks until the step is done
        times.append(time.perf_counter() - t)
        done_flops += flops[shape]
        tokens += int(batch["input_ids"].size)

    # as the loop does (a decoder classifies by scoring each class's verbaliser: lm_classes)
    eval_fn = placement.jit_eval_step(make_eval_step(method, run.lm_classes))
    val_batches = list(data_lib.eval_batches(encoded["validation"], tc.eval_batch_size, tc.bucket_multiple))
    val_tokens = sum(int(b["input_ids"].size) for b in val_batches)
    shape_flops: dict[tuple, float] = {}   # XLA's count for each bucket's program, compiled once
    for b in val_batches:
        shape = b["input_ids"].shape
        if shape not in shape_flops:
            shape_flops[shape] = measure.cost_analysis(
                eval_fn.lower(state.trainable, frozen, state.method_state, b).compile()).get("flops", 0.0)
    val_flops = sum(shape_flops[b["input_ids"].shape] for b in val_batches)
    passes = []
    for _ in range(2):   # the first pass compiles each bucket's program; the second is timed
        t = time.perf_counter()
        metrics = loop.evaluate(eval_fn, state.trainable, frozen, state.method_state, encoded["validation"],
                                tc.eval_batch_size, task, tc.bucket_multiple)
        passes.append(time.perf_counter() - t)
    val_s = passes[-1]
    step_s = statistics.median(times)
    evaluations = -(-tc.steps // tc.eval_every)
    print(json.dumps({
        "cell": cell.label, "cell_id": cell.id, "backend": jax.default_backend(), "host": machine,
        "setup_s": round(setup_s, 2),
        "train": {"steps_timed": len(times), "step_s": round(step_s, 4),
                  "step_s_all": [round(x, 4) for x in times],
                  "tokens_per_s": round(tokens / sum(times), 1),
                  "gflops_per_s": round(done_flops / sum(times) / 1e9, 1) if done_flops else None,
                  "compile_s": round(compile_s, 2), "shapes": sorted(list(s) for s in compiled)},
        "validation": {"rows": data_lib.num_rows(encoded["validation"]), "seconds": round(val_s, 2),
                       "first_pass_s": round(passes[0], 2), "padded_tokens": val_tokens,
                       "tokens_per_s": round(val_tokens / val_s, 1),
                       "gflops_per_s": round(val_flops / val_s / 1e9, 1) if val_flops else None,
                       "metrics": metrics},
        "cell_estimate_s": round(tc.steps * step_s + evaluations * val_s, 1),
    }, indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)

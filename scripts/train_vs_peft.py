"""The same training run, step by step, in peftjax and in transformers + peft (PyTorch, CPU).

    python scripts/train_vs_peft.py --model=all-MiniLM-L6-v2 --task=tweet_sentiment \
      --methods=all --steps=100 --batch=32 --out=experiments/train_vs_peft

For every method both frameworks implement (``peftjax.interop.train_parity.METHODS``: lora,
rslora, dora, pissa, olora, lora_ga, loraplus, lora_fa, adalora, vera, hira, ia3, prompt_tuning,
prefix_tuning, ln_tuning, bitfit, full) it
trains the model's checkpoint (pooling ``cls``: transformers' head) on the task's training
batches from one starting point — the method's initial tensors drawn by peftjax and carried to
PEFT, the same batches, dropout off, the same AdamW, schedule and clipping, fp32 — and writes
``<out>/train_vs_peft.json`` (per method: ``method``, ``steps``, ``loss_ours``, ``loss_peft``,
``max_rel_loss_diff``, ``final_param_max_abs_diff``, AdaLoRA's ranks on both sides, wall times
and the checks made) and ``<out>/plots/<method>.png`` (both loss curves and their relative
difference). The JSON is rewritten after each method. ``--noise_floor`` (on) also trains each
side again from a start one ulp away: how far float rounding alone moves that run's losses, the
yardstick for the cross-framework difference. See the module's docstring for exactly
what is made identical and where PEFT's behaviour had to be written out.

Exit code 0 even when a method misses ``--tolerance``: the report says which (``within_tolerance``),
so a long run is never lost to one method.
"""

import os
import sys
import tempfile

import _bootstrap
from absl import app, flags, logging

flags.DEFINE_string("model", "all-MiniLM-L6-v2", "named model (configs/models) with a classification head")
flags.DEFINE_string("task", "tweet_sentiment", "classification task (configs/tasks)")
flags.DEFINE_list("methods", ["all"], "parity methods, or 'all'")
flags.DEFINE_integer("steps", 100, "training steps (optimizer updates)")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_integer("seed", 0, "data order and peftjax's initial draws")
flags.DEFINE_integer("train_limit", 0, "use the first N training rows (0: all)")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default)")
flags.DEFINE_float("tolerance", 1e-3, "max relative loss difference a method must stay within")
flags.DEFINE_bool("noise_floor", True, "also train each side again from a start one ulp away, to "
                  "measure how much float rounding alone moves this run's losses (doubles the time)")
flags.DEFINE_bool("resume", True, "keep the methods an earlier run with the same settings already "
                  "wrote to <out>/train_vs_peft.json (each record names its commit)")
flags.DEFINE_bool("report_only", False, "only rewrite <out>/report.md and the plots from "
                  "<out>/train_vs_peft.json")
flags.DEFINE_string("out", "runs/train_vs_peft", "output folder")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from peftjax.interop import train_parity as tp

    if FLAGS.report_only:
        return write_report(tp)
    methods = list(tp.METHODS) if FLAGS.methods == ["all"] else FLAGS.methods
    bad = [m for m in methods if m not in tp.METHODS]
    if bad:
        raise app.UsageError(f"--methods {bad} are not compared; valid: {', '.join(tp.METHODS)} or all")
    if FLAGS.steps < 1 or FLAGS.batch < 1:
        raise app.UsageError("--steps and --batch must be >= 1")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()   # load reports of the fresh head, deprecations
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as workdir:
        folder, encoded, num_labels, facts = tp.checkpoint_and_data(
            FLAGS.model, FLAGS.task, workdir=workdir, train_limit=FLAGS.train_limit, seed=FLAGS.seed)
        base = tp.load_base(folder, num_labels=num_labels, pooling="cls", seed=FLAGS.seed)
        log(tp.SUMMARY_HEADER)
        report = tp.run_all(methods, base, encoded, steps=FLAGS.steps, batch_size=FLAGS.batch,
                            seed=FLAGS.seed, out_dir=FLAGS.out, facts=facts,
                            noise_floor=FLAGS.noise_floor, resume=FLAGS.resume, log=log)
    for r in report["methods"]:
        r["within_tolerance"] = r["max_rel_loss_diff"] <= FLAGS.tolerance and r.get("rank_patterns_equal", True)
    from peftjax.files import write_json_atomic

    report["tolerance"] = FLAGS.tolerance
    write_json_atomic(os.path.join(FLAGS.out, "train_vs_peft.json"), report, indent=1)
    print(tp.SUMMARY_HEADER)
    for r in report["methods"]:
        print(tp.summary_row(r))
    write_report(tp)
    missed = [r["method"] for r in report["methods"] if not r["within_tolerance"]]
    print(f"\n{len(report['methods']) - len(missed)}/{len(report['methods'])} methods within "
          f"{FLAGS.tolerance:g}" + (f"; outside: {', '.join(missed)}" if missed else ""))


def write_report(tp) -> None:
    """``<out>/report.md`` (the table, settings and versions) and the plots, from the JSON."""
    import json

    from peftjax.files import write_text_atomic

    with open(os.path.join(FLAGS.out, "train_vs_peft.json")) as f:
        report = json.load(f)
    for r in report["methods"]:
        tp.plot(r, os.path.join(FLAGS.out, r["plot"]))
    command = (f"python scripts/train_vs_peft.py --model={report['model']} --task={report['task']} "
               f"--methods=all --steps={report['steps']} --batch={report['batch_size']} --out={FLAGS.out}")
    write_text_atomic(os.path.join(FLAGS.out, "report.md"), tp.report_markdown(report, command=command))
    print(f"report: {os.path.join(FLAGS.out, 'report.md')}")


if __name__ == "__main__":
    _bootstrap.run(main)

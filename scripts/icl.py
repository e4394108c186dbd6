"""In-context learning baseline: k-shot prompts scored by verbaliser log-likelihood; no training.

    python scripts/icl.py --model=runs/decoder_tweets/pretrained_large --task=tweet_sentiment \
      --k=4 --limit=500

``--model`` is a checkpoint folder (config.json + safetensors + tokenizer) or a built-in model
name with a tokenizer. Demonstrations come from the task's training split, chosen by ``--seed``
(a fresh draw per example, or ``--selection=fixed``), separated by ``--separator`` (default a
blank line; ``--eos_after_demo`` ends each with EOS as before issue 15). ``--calibration=contextual``
divides the class probabilities by those of the content-free inputs ``--content_free`` under the
same demonstrations (Zhao et al. 2021). Prints the metrics as JSON and writes them to ``--output``
when given.
"""

import json

import _bootstrap
from _decoding import load_causal_lm, task_template
from absl import app, flags, logging

flags.DEFINE_string("model", None, "checkpoint folder or built-in model name (a causal LM)")
flags.DEFINE_string("task", "tweet_sentiment", "a classification task")
flags.DEFINE_string("split", "test", "evaluation split")
flags.DEFINE_integer("limit", 0, "evaluate the first N examples (0: all)")
flags.DEFINE_integer("k", 4, "demonstrations per prompt")
flags.DEFINE_integer("seed", 0, "seed of the demonstration choice")
flags.DEFINE_enum("selection", "random", ["random", "fixed"], "per-example draw or one shared draw")
flags.DEFINE_bool("balanced", False, "draw demonstrations round-robin over the classes")
flags.DEFINE_string("template", "", "prompt template (default: the task config's lm_template)")
flags.DEFINE_string("separator", "\\n\\n",
                    "text after each demonstration; backslash escapes (\\n, \\t) are decoded")
flags.DEFINE_bool("eos_after_demo", False, "end each demonstration's answer with EOS (and score the query's EOS)")
flags.DEFINE_enum("calibration", "none", ["none", "contextual"],
                  "contextual: divide by the class probabilities of content-free inputs (Zhao et al. 2021)")
flags.DEFINE_list("content_free", ["N/A", "", "[MASK]"], "content-free query strings for --calibration=contextual")
flags.DEFINE_integer("max_demo_tokens", 48, "each demonstration's text is cut to this many tokens")
flags.DEFINE_integer("max_length", 64, "token budget of the query part")
flags.DEFINE_integer("batch_size", 32, "prompts per scoring batch")
flags.DEFINE_string("output", "", "also write the JSON here")
flags.mark_flags_as_required(["model"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from peftjax import data
    from peftjax.methods.icl import ICLConfig, evaluate_icl
    from peftjax.files import write_json_atomic

    task = data.get_task(FLAGS.task)
    separator = FLAGS.separator.encode("latin-1", "backslashreplace").decode("unicode_escape")
    lm, tokenizer = load_causal_lm(FLAGS.model)
    config = ICLConfig(k=FLAGS.k, seed=FLAGS.seed, selection=FLAGS.selection, balanced=FLAGS.balanced,
                       template=task_template(FLAGS.task, FLAGS.template), max_demo_tokens=FLAGS.max_demo_tokens,
                       max_length=FLAGS.max_length, separator=separator, eos_after_demo=FLAGS.eos_after_demo,
                       calibration=FLAGS.calibration, content_free=tuple(FLAGS.content_free))
    train = data.load_examples(task.name, task.train_split)
    queries = data.load_examples(task.name, FLAGS.split, limit=FLAGS.limit or None)
    res = evaluate_icl(lm, tokenizer, task, train, queries, config, batch_size=FLAGS.batch_size, progress=True)
    out = {"model": FLAGS.model, "task": task.name, "split": FLAGS.split, "examples": len(queries),
           "icl": {"k": config.k, "seed": config.seed, "selection": config.selection,
                   "balanced": config.balanced, "template": config.template, "separator": config.separator,
                   "eos_after_demo": config.eos_after_demo, "calibration": config.calibration,
                   "content_free": list(config.content_free) if config.calibration != "none" else None},
           "metrics": res["metrics"], "mean_sequence_tokens": res["mean_sequence_tokens"]}
    if config.calibration != "none":
        out["p_cf_mean"] = [round(float(p), 6) for p in res["p_cf_mean"]]
        out["content_free_prompts"] = res["content_free_prompts"]
        out["uncalibrated_metrics"] = res["uncalibrated_metrics"]
    if FLAGS.output:
        write_json_atomic(FLAGS.output, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    _bootstrap.run(main)

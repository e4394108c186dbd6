"""Proxy-tuning (Liu et al. 2024): steer a large base LM with a small tuned/untuned pair at
decoding time; classify a task's examples and/or generate from prompts.

    python scripts/proxy_tune.py --base=runs/decoder_tweets/pretrained_large \
      --tuned_run=runs/decoder_tweets/tune_small_lora --task=tweet_sentiment --limit=500 \
      --alphas=0,1 --prompt="Tweet: what a lovely day
    Sentiment:"

``--tuned_run`` is the workdir of a finished decoder run of scripts/train.py (``task.format=lm``):
its best trainable tree is restored onto its base checkpoint, which is also the untuned
anti-expert unless ``--untuned`` names another folder. ``--tuned`` instead takes a plain
checkpoint folder of the tuned small model. All three models must share the base's vocabulary.
"""

import json

import _bootstrap
from _decoding import load_causal_lm, task_template
from absl import app, flags, logging

flags.DEFINE_string("base", None, "checkpoint folder or model name of the large base LM")
flags.DEFINE_string("tuned_run", "", "workdir of a finished decoder run (the tuned small model)")
flags.DEFINE_string("tuned", "", "checkpoint folder of a tuned small model (instead of --tuned_run)")
flags.DEFINE_string("untuned", "", "checkpoint folder of the untuned small model "
                    "(default: the base checkpoint of --tuned_run)")
flags.DEFINE_list("alphas", ["1.0"], "steering strengths α (0 = the base model alone)")
flags.DEFINE_string("task", "", "classify this task's examples (verbaliser log-likelihood)")
flags.DEFINE_string("split", "test", "evaluation split")
flags.DEFINE_integer("limit", 0, "evaluate the first N examples (0: all)")
flags.DEFINE_integer("batch_size", 64, "sequences per scoring batch")
flags.DEFINE_multi_string("prompt", [], "generate a continuation of this prompt (repeatable)")
flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate per prompt")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sampling temperature (after combining)")
flags.DEFINE_float("top_p", 1.0, "nucleus filtering of the combined distribution")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_string("output", "", "also write the JSON here")
flags.mark_flags_as_required(["base"])
FLAGS = flags.FLAGS


def restore_tuned(run_dir: str):
    """(CausalLM with the run's best trainable tree, its base checkpoint folder, template)."""
    from peftjax.methods.proxy_tuning import CausalLM
    from peftjax.train import load_run

    run = load_run(run_dir)
    if run.model.head != "causal_lm":
        raise ValueError(f"{run_dir} trained a {run.model.head} head; proxy-tuning needs a decoder run "
                         "(task.format=lm)")
    lm = CausalLM.adapted(run.method, run.trainable, run.frozen, run.state)
    return lm, run.config.model.get("checkpoint", ""), run.config.task.get("lm_template", "")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from peftjax import data
    from peftjax.data.lm import encode_lm
    from peftjax.methods.proxy_tuning import (check_compatible, classify, proxy_class_scores,
                                              proxy_generate)
    from peftjax.models import hf_io
    from peftjax.files import write_json_atomic

    if bool(FLAGS.tuned_run) == bool(FLAGS.tuned):
        raise app.UsageError("give exactly one of --tuned_run and --tuned")
    base, tokenizer = load_causal_lm(FLAGS.base)
    if FLAGS.tuned_run:
        tuned, untuned_folder, run_template = restore_tuned(FLAGS.tuned_run)
        tuned_tok = hf_io.load_tokenizer(untuned_folder) if untuned_folder else tokenizer
    else:
        tuned, tuned_tok = load_causal_lm(FLAGS.tuned)
        untuned_folder, run_template = "", ""
    untuned_folder = FLAGS.untuned or untuned_folder
    if not untuned_folder:
        raise app.UsageError("--untuned is required when the tuned run has no base checkpoint folder")
    untuned, untuned_tok = load_causal_lm(untuned_folder)
    check_compatible(base, tuned, untuned, (tokenizer, tuned_tok, untuned_tok))
    alphas = [float(a) for a in FLAGS.alphas]
    out = {"base": FLAGS.base, "tuned": FLAGS.tuned_run or FLAGS.tuned, "untuned": untuned_folder,
           "alphas": alphas}
    if FLAGS.task:
        task = data.get_task(FLAGS.task)
        template = run_template or task_template(task.name)
        examples = data.load_examples(task.name, FLAGS.split, limit=FLAGS.limit or None)
        enc = encode_lm(examples, tokenizer, 64, task, template, candidates=True)
        out.update(task=task.name, split=FLAGS.split, examples=len(examples), template=template, metrics={})
        for a in alphas:
            preds = classify(lambda b: proxy_class_scores(base, tuned, untuned, b, task.num_labels, alpha=a),
                             enc, FLAGS.batch_size, progress=True, desc=f"proxy α={a:g}")
            out["metrics"][f"{a:g}"] = data.compute_metrics(task, preds, enc["class_labels"])
    if FLAGS.prompt:
        rng = jax.random.PRNGKey(FLAGS.seed) if FLAGS.temperature > 0 else None
        out["generations"] = {}
        for a in alphas:
            texts = []
            for prompt in FLAGS.prompt:  # one at a time: no padding to reason about
                ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
                ids = np.asarray([ids + tokenizer(prompt, add_special_tokens=False)["input_ids"]], np.int32)
                gen = proxy_generate(base, tuned, untuned, ids, None, FLAGS.max_new_tokens, alpha=a,
                                     temperature=FLAGS.temperature, top_p=FLAGS.top_p, rng=rng,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                texts.append(tokenizer.decode(np.asarray(gen)[0, ids.shape[1]:], skip_special_tokens=True))
            out["generations"][f"{a:g}"] = texts
    if FLAGS.output:
        write_json_atomic(FLAGS.output, out)
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    _bootstrap.run(main)

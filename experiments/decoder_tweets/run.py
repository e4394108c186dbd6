"""Decoder experiment: proxy-tuning and in-context learning on 3-way tweet sentiment, offline.

    python experiments/decoder_tweets/run.py --workdir=runs/decoder_tweets \
        --out=experiments/decoder_tweets

What it does (every stage is real compute on the committed code; CPU, fp32):

1. **Tokenizer.** A byte-level BPE vocabulary (``--vocab`` tokens, ``<pad>``/``<s>``/``</s>``)
   trained on the tweet_sentiment *training* texts with the ``tokenizers`` library; one
   vocabulary is shared by every model, as proxy-tuning requires.
2. **Pretraining.** Two Llama decoders, *small* and *large*, trained from random init with the
   causal-LM loss on the training tweets' text only (no labels, no prompt format): documents
   ``<s> tweet </s>`` packed into ``--seq``-token rows. Saved as Hugging Face folders
   (``hf_io.save_pretrained``) in the workdir, never in git.
3. **Tuning the small model** with LoRA through the ordinary training loop
   (``peftjax.train.train_and_evaluate``, ``task.format=lm``: prompt
   ``Tweet: {text}\\nSentiment:`` + verbaliser, loss on the verbaliser; model selection on the
   first ``--eval_limit`` validation tweets). ``--tune_large`` also LoRA-tunes the large model the
   same way: the reference proxy-tuning tries to approach.
4. **Evaluation** on the first ``--eval_limit`` test tweets (the split is stored shuffled, so a
   prefix is a random sample), every system scored by verbaliser log-likelihood: majority class
   (of the training labels), small / large zero-shot, large k-shot ICL, small tuned, proxy-tuned
   large (α sweep), and — with ``--tune_large`` — large tuned. A greedy *generation* check on
   the first ``--gen_limit`` test prompts: does the continuation start with the gold label word?

Writes ``OUT/results.json`` (settings, timings, every number) and ``OUT/report.md`` (tables).
Stages are cached in the workdir (tokenizer, checkpoints, the loop's own resumable runs).
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402

from peftjax.files import write_json_atomic, write_text_atomic  # noqa: E402

flags.DEFINE_string("workdir", "runs/decoder_tweets", "tokenizer, checkpoints and loop runs (not in git)")
flags.DEFINE_string("out", None, "where results.json and report.md go (default: the workdir)")
flags.DEFINE_integer("vocab", 4096, "BPE vocabulary size")
flags.DEFINE_integer("seq", 64, "pretraining row length (tokens)")
flags.DEFINE_integer("pretrain_batch", 16, "pretraining rows per step")
flags.DEFINE_integer("small_steps", 300, "pretraining steps of the small model")
flags.DEFINE_integer("large_steps", 300, "pretraining steps of the large model")
flags.DEFINE_float("pretrain_lr", 3e-3, "peak pretraining learning rate (cosine, 5% warmup)")
flags.DEFINE_integer("tune_steps", 300, "LoRA tuning steps (batch 32)")
flags.DEFINE_float("tune_lr", 2e-3, "LoRA learning rate")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank (all attention and MLP projections)")
flags.DEFINE_bool("tune_large", False, "also LoRA-tune the large model (the direct-tuning reference)")
flags.DEFINE_integer("eval_limit", 500, "validation/test tweets evaluated (a fixed random sample)")
flags.DEFINE_integer("icl_k", 4, "demonstrations per ICL prompt")
flags.DEFINE_list("alphas", ["0.5", "1.0", "2.0"], "proxy-tuning strengths α")
flags.DEFINE_integer("gen_limit", 200, "test prompts for the greedy generation check")
flags.DEFINE_integer("seed", 0, "seed of initialisation, data order and ICL selection")
FLAGS = flags.FLAGS

TASK = "tweet_sentiment"
LORA_TARGETS = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def llama_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def sizes(vocab: int) -> dict[str, dict]:
    return {"small": llama_config(vocab, 128, 2, 4, 2, 352),
            "large": llama_config(vocab, 256, 4, 8, 4, 688)}


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.t0, 1)

        return _T()


# ------------------------------------------------------------------------------------------
# 1. Tokenizer


def train_tokenizer(texts: list[str], vocab: int, folder: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------------------------
# 2. Pretraining


def packed_rows(tokenizer, texts: list[str], seq: int):
    import numpy as np

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = np.concatenate([np.asarray([tokenizer.bos_token_id, *t, tokenizer.eos_token_id], np.int32)
                             for t in ids])
    n = len(stream) // seq
    rows = stream[: n * seq].reshape(n, seq)
    return {"input_ids": rows, "attention_mask": np.ones_like(rows), "labels": rows.copy()}


def pretrain(name: str, hf: dict, train_rows: dict, val_rows: dict, steps: int, folder: str,
             tokenizer) -> dict:
    """Full-parameter causal-LM training from random init; saves an HF folder; returns stats."""
    import jax
    import ml_collections
    import numpy as np
    from flax import traverse_util
    from tqdm.auto import tqdm

    from peftjax import data as data_lib
    from peftjax import methods
    from peftjax.models import build_model, hf_io
    from peftjax.losses import causal_lm_loss
    from peftjax.train.optim import make_optimizer
    from peftjax.train.steps import init_state, make_train_step

    stats_path = os.path.join(folder, "pretrain_stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            return json.load(f)
    model = build_model(hf, head="causal_lm")
    base = traverse_util.flatten_dict(model.init(jax.random.PRNGKey(FLAGS.seed)), sep=".")
    method = methods.create("full", model)
    peft = method.setup(jax.random.PRNGKey(FLAGS.seed), base)
    cfg = ml_collections.ConfigDict(dict(learning_rate=FLAGS.pretrain_lr, warmup_steps=0, warmup_ratio=0.05,
                                         schedule="cosine", weight_decay=0.01, clip_norm=1.0,
                                         grad_accum_steps=1, b1=0.9, b2=0.95, eps=1e-8))
    tx, _ = make_optimizer(cfg, steps)
    state = init_state(peft.trainable, peft.state, tx)
    step_fn = jax.jit(make_train_step(method, tx, FLAGS.seed), donate_argnums=(0,))
    batches = data_lib.train_batches(train_rows, FLAGS.pretrain_batch, FLAGS.seed)
    losses, times = [], []
    bar = tqdm(range(steps), desc=f"pretrain {name}", unit="step", dynamic_ncols=True)
    for i in bar:
        t0 = time.perf_counter()
        state, m = step_fn(state, peft.frozen, next(batches))
        loss = float(m["loss"])
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
    params = method.effective_base(state.trainable, peft.frozen, state.method_state)

    @jax.jit
    def val_loss(p, batch):
        logits = model.module.apply({"params": p}, batch["input_ids"], batch["attention_mask"])
        return causal_lm_loss(logits, batch)

    nested = traverse_util.unflatten_dict(params, sep=".")
    vals = [float(val_loss(nested, b)) for b in data_lib.eval_batches(val_rows, 32)
            if bool(np.all(b["mask"]))]
    hf_io.save_pretrained(model, nested, folder)
    tokenizer.save_pretrained(folder)
    counts = methods.count_params(method)
    stats = {"params": counts["total_params"], "steps": steps, "tokens_seen": steps * FLAGS.pretrain_batch * FLAGS.seq,
             "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])),
             "val_loss": float(np.mean(vals)), "val_perplexity": float(np.exp(np.mean(vals))),
             "step_time_s": float(np.median(times)) if times else None}
    write_json_atomic(stats_path, stats)
    return stats


# ------------------------------------------------------------------------------------------
# 3. Tuning through the training loop


def tune(name: str, folder: str, hf: dict, workdir: str):
    """LoRA-tunes the model in ``folder`` with the loop (task.format=lm); returns (result, CausalLM
    of the best trainable tree, merged plain params)."""
    import ml_collections

    from configs.train import get_config
    from peftjax.methods.proxy_tuning import CausalLM
    from peftjax.train import load_run, loop

    config = get_config(f"model=tiny-llama,method=lora,task={TASK}")
    with config.unlocked():
        config.model = ml_collections.ConfigDict(dict(name=f"decoder-{name}", checkpoint=folder,
                                                      hf_config=hf, tokenizer=""))
    config.seed = FLAGS.seed
    config.task.format = "lm"
    config.method.rank = FLAGS.lora_rank
    config.method.alpha = 2.0 * FLAGS.lora_rank
    config.method.targets = LORA_TARGETS
    t = config.train
    t.steps, t.batch_size, t.learning_rate = FLAGS.tune_steps, 32, FLAGS.tune_lr
    t.eval_every = t.checkpoint_every = max(FLAGS.tune_steps // 3, 1)
    t.eval_limit, t.eval_batch_size, t.warmup_ratio = FLAGS.eval_limit, 64, 0.06
    run_dir = os.path.join(workdir, f"tune_{name}_lora")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
    else:
        result = loop.train_and_evaluate(config, run_dir)

    # The best trainable tree (the one the loop tested).
    run = load_run(run_dir)
    adapted = CausalLM.adapted(run.method, run.trainable, run.frozen, run.state)
    merged = run.method.merged_params(run.trainable, run.frozen, run.state)
    return result, adapted, CausalLM.plain(run.model, merged)


# ------------------------------------------------------------------------------------------
# 4. Evaluation


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from peftjax import data as data_lib
    from peftjax.data.lm import encode_lm, prompt_ids, verbalizers
    from peftjax.methods.icl import ICLConfig, evaluate_icl
    from peftjax.methods.proxy_tuning import (CausalLM, check_compatible, classify, lm_class_scores,
                                              proxy_class_scores, proxy_generate)
    from peftjax.models import generation, hf_io

    out_dir = FLAGS.out or FLAGS.workdir
    os.makedirs(FLAGS.workdir, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    timer = Timer()
    task = data_lib.get_task(TASK)
    from configs.train import _load

    template = _load("tasks", TASK).get_config().lm_template
    train = data_lib.load_examples(TASK, "train")
    val = data_lib.load_examples(TASK, "validation")
    test = data_lib.load_examples(TASK, "test", limit=FLAGS.eval_limit)

    with timer("tokenizer"):
        tokenizer = train_tokenizer([e["text_a"] for e in train], FLAGS.vocab,
                                    os.path.join(FLAGS.workdir, "tokenizer"))
    hf = sizes(len(tokenizer))
    pre_stats, folders = {}, {}
    with timer("pack"):
        train_rows = packed_rows(tokenizer, [e["text_a"] for e in train], FLAGS.seq)
        val_rows = packed_rows(tokenizer, [e["text_a"] for e in val[:2000]], FLAGS.seq)
    for name, steps in (("small", FLAGS.small_steps), ("large", FLAGS.large_steps)):
        folders[name] = os.path.join(FLAGS.workdir, f"pretrained_{name}")
        with timer(f"pretrain_{name}"):
            pre_stats[name] = pretrain(name, hf[name], train_rows, val_rows, steps, folders[name], tokenizer)

    tuned_results, tuned, merged = {}, {}, {}
    for name in ("small", "large") if FLAGS.tune_large else ("small",):
        with timer(f"tune_{name}"):
            tuned_results[name], tuned[name], merged[name] = tune(name, folders[name], hf[name], FLAGS.workdir)

    small_model, small_params = hf_io.load_pretrained(folders["small"], head="causal_lm")
    large_model, large_params = hf_io.load_pretrained(folders["large"], head="causal_lm")
    untuned = CausalLM.plain(small_model, small_params)
    large = CausalLM.plain(large_model, large_params)
    check_compatible(large, tuned["small"], untuned, (tokenizer, tokenizer, tokenizer))

    # One encoded test set for every system, sorted by length (less padding), metrics in any order.
    enc = encode_lm(test, tokenizer, 64, task, template, candidates=True)
    order = np.argsort(enc["attention_mask"].sum(1), kind="stable")
    enc = {k: v[order] for k, v in enc.items()}
    labels = enc["class_labels"]
    K = task.num_labels
    rows: list[dict] = []

    def add(system: str, preds, **extra):
        m = data_lib.compute_metrics(task, preds, labels)
        rows.append({"system": system, **{k: round(float(v), 4) for k, v in m.items()}, **extra})
        print(f"{system:<40s} acc={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f}", flush=True)

    majority = int(np.bincount([e["label"] for e in train], minlength=K).argmax())
    add(f"majority class ({task.label_names[majority]}, from train)", np.full(len(labels), majority),
        trained_params=0)
    n_small, n_large = pre_stats["small"]["params"], pre_stats["large"]["params"]
    lora_small = tuned_results["small"]["trainable_params"]
    score = lambda lm: classify(lambda b: lm_class_scores(lm, b, K), enc, 64)
    with timer("eval_zero_shot"):
        add("small, zero-shot", score(untuned), model_params=n_small, trained_params=0)
        add("large, zero-shot", score(large), model_params=n_large, trained_params=0)
    with timer("eval_icl"):
        for k, balanced in ((FLAGS.icl_k, False), (FLAGS.icl_k - 1, True)):
            icl_cfg = ICLConfig(k=k, seed=FLAGS.seed, balanced=balanced, template=template, max_length=64,
                                max_demo_tokens=48)
            res = evaluate_icl(large, tokenizer, task, train, test, icl_cfg, batch_size=32, progress=True)
            add(f"large, ICL k={k}" + (" (class-balanced)" if balanced else ""), res["predictions"][order],
                model_params=n_large, trained_params=0,
                mean_tokens_per_scored_sequence=round(res["mean_sequence_tokens"], 1),
                demo_separator=icl_cfg.separator, eos_after_demo=icl_cfg.eos_after_demo)
    with timer("eval_tuned"):
        small_preds = score(tuned["small"])
        add("small, LoRA-tuned (expert)", small_preds, model_params=n_small, trained_params=lora_small)
        loop_test = tuned_results["small"]["metrics"]["test"]
    with timer("eval_proxy"):
        for a in [float(x) for x in FLAGS.alphas]:
            preds = classify(lambda b: proxy_class_scores(large, tuned["small"], untuned, b, K, alpha=a), enc, 64,
                             progress=True, desc=f"proxy α={a}")
            add(f"large, proxy-tuned α={a:g}", preds, model_params=n_large + 2 * n_small,
                trained_params=lora_small)
    if FLAGS.tune_large:
        with timer("eval_large_tuned"):
            add("large, LoRA-tuned (direct reference)", score(tuned["large"]), model_params=n_large,
                trained_params=tuned_results["large"]["trainable_params"])

    # Greedy generation: does the continuation of "Tweet: …\nSentiment:" start with the gold label?
    with timer("generation"):
        gen = test[: FLAGS.gen_limit]
        prompts = [[tokenizer.bos_token_id] + prompt_ids(tokenizer, e, template, 48) for e in gen]
        width = max(len(p) for p in prompts)
        ids = np.zeros((len(gen), width), np.int32)
        mask = np.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row continues at the same slot
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
        words = [w.strip() for w in verbalizers(task)]

        def judge(out):
            texts = tokenizer.batch_decode(np.asarray(out)[:, width:], skip_special_tokens=True)
            first = [t.strip().split()[0] if t.strip() else "" for t in texts]
            gold = [words[e["label"]] for e in gen]
            return {"label_word_accuracy": round(float(np.mean([f == g for f, g in zip(first, gold)])), 4),
                    "valid_label_rate": round(float(np.mean([f in words for f in first])), 4)}, texts

        new = 4
        generations = {}
        g_large, t_large = judge(generation.generate(large_model, large.weights, ids, mask, new))
        g_small, t_small = judge(generation.generate(small_model, merged["small"].weights, ids, mask, new))
        g_proxy, t_proxy = judge(proxy_generate(large, tuned["small"], untuned, ids, mask, new, alpha=1.0))
        generations = {"large, zero-shot": g_large, "small, LoRA-tuned (merged)": g_small,
                       "large, proxy-tuned α=1": g_proxy}
        rng = jax.random.PRNGKey(FLAGS.seed)
        a1 = proxy_generate(large, tuned["small"], untuned, ids[:8], mask[:8], new, alpha=1.0, temperature=1.0,
                            top_p=0.9, rng=rng)
        a2 = proxy_generate(large, tuned["small"], untuned, ids[:8], mask[:8], new, alpha=1.0, temperature=1.0,
                            top_p=0.9, rng=rng)
        sampled_deterministic = bool(np.array_equal(np.asarray(a1), np.asarray(a2)))
        samples = [{"tweet": e["text_a"], "gold": words[e["label"]], "large": t_large[i], "small_tuned": t_small[i],
                    "proxy": t_proxy[i]} for i, e in enumerate(gen[:6])]

    results = {
        "command": "python experiments/decoder_tweets/run.py " + " ".join(sys.argv[1:]),
        "task": TASK, "template": template, "tokenizer": {"kind": "byte-level BPE", "vocab": len(tokenizer)},
        "eval": f"first {len(test)} tweets of the test split (stored shuffled: a fixed random sample)",
        "models": {k: {kk: v[kk] for kk in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "intermediate_size", "vocab_size")}
                   for k, v in hf.items()},
        "pretraining": pre_stats,
        "tuning": {k: {"method": "lora", "rank": FLAGS.lora_rank, "targets": LORA_TARGETS,
                       "trainable_params": r["trainable_params"], "steps": r["steps"],
                       "best_step": r["best_step"], "validation": r["metrics"]["validation"],
                       "loop_test": r["metrics"]["test"], "step_time_s": r["step_time_s"]}
                   for k, r in tuned_results.items()},
        "small_tuned_matches_loop_test": abs(loop_test["accuracy"] - next(
            r["accuracy"] for r in rows if r["system"].startswith("small, LoRA"))) < 1e-9,
        "classification": rows,
        "generation": {"prompts": len(gen), "max_new_tokens": new, "greedy": generations,
                       "sampled_twice_same_seed_identical": sampled_deterministic, "samples": samples},
        "flags": {k: FLAGS[k].value for k in ("vocab", "seq", "pretrain_batch", "small_steps", "large_steps",
                                              "pretrain_lr", "tune_steps", "tune_lr", "lora_rank", "tune_large",
                                              "eval_limit", "icl_k", "alphas", "gen_limit", "seed")},
        "seconds": timer.seconds,
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
    }
    path = os.path.join(out_dir, "results.json")
    write_json_atomic(path, results)
    write_report(results, os.path.join(out_dir, "report.md"))
    print(open(os.path.join(out_dir, "report.md")).read())


def write_report(r: dict, path: str) -> None:
    lines = [f"# Decoder experiment: {r['task']} (generated by run.py)", "", f"Command: `{r['command']}`", "",
             f"Evaluation: {r['eval']}; classes scored by verbaliser log-likelihood after "
             f"`{r['template']!r}`.", "",
             "| system | accuracy | macro-F1 | model params | trained params |", "|---|---|---|---|---|"]
    for row in r["classification"]:
        lines.append(f"| {row['system']} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | "
                     f"{row.get('model_params', '—'):,} | {row.get('trained_params', 0):,} |"
                     if isinstance(row.get("model_params"), int) else
                     f"| {row['system']} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | — | 0 |")
    lines += ["", "Greedy generation (first word of a 4-token continuation vs the gold label, "
              f"{r['generation']['prompts']} test prompts):", "",
              "| system | label-word accuracy | valid-label rate |", "|---|---|---|"]
    for k, v in r["generation"]["greedy"].items():
        lines.append(f"| {k} | {v['label_word_accuracy']:.4f} | {v['valid_label_rate']:.4f} |")
    lines += ["", "Pretraining (causal LM on training-tweet text):", "",
              "| model | params | steps | tokens | final train loss | val perplexity | step time (s) |",
              "|---|---|---|---|---|---|---|"]
    for k, s in r["pretraining"].items():
        lines.append(f"| {k} | {s['params']:,} | {s['steps']} | {s['tokens_seen']:,} | {s['final_loss']:.3f} | "
                     f"{s['val_perplexity']:.1f} | {s['step_time_s']:.3f} |")
    lines += ["", "Wall-clock seconds per stage: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()),
              f"({r['backend']}, {r['device']})", ""]
    write_text_atomic(path, "\n".join(lines))


if __name__ == "__main__":
    app.run(main)

"""Decoders through the training loop on text: instruction tuning (JSONL, response-only loss) and
classification through verbalisers (task.format='lm'), on tiny random models, offline."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs.train import get_config
from peftjax.data import tweets
from peftjax.train import train_and_evaluate

COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
           "sun": "yellow", "sea": "blue", "leaf": "green"}


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A learnable instruction file: the colour of a thing, with and without an input field."""
    rows = []
    for i in range(96):
        thing = list(COLOURS)[i % len(COLOURS)]
        if i % 4:
            rows.append({"instruction": "Name its colour.", "input": f"{thing} {i}", "output": COLOURS[thing]})
        else:
            rows.append({"instruction": f"Name the colour of {thing} {i}.", "output": COLOURS[thing]})
    path = tmp_path_factory.mktemp("instr") / "colours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def tiny_decoder_config(task: str, method: str = "lora", **train):
    config = get_config(f"model=tiny-llama,method={method},task={task}")
    with config.unlocked():
        # Larger random init: with hidden 32 and N(0, 0.02) weights the frozen LM head keeps every
        # logit within ~0.1 of uniform over 30k tokens, and no adapter could move the loss visibly.
        config.model.hf_config.initializer_range = 0.2
    values = dict(steps=12, batch_size=8, eval_batch_size=16, eval_every=4, checkpoint_every=100,
                  log_every=1, learning_rate=1e-2, warmup_ratio=0.0, progress=False)
    values.update(train)
    for k, v in values.items():
        config.train[k] = v
    return config


def rows(workdir, split):
    with open(f"{workdir}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_instruction_tuning_learns_the_responses_and_is_deterministic(jsonl, tmp_path):
    config = tiny_decoder_config(f"jsonl:{jsonl}")
    config.task.prompt_template, config.task.prompt_template_no_input = "{instruction} {input} =>", "{instruction} =>"
    config.task.max_length = 24
    config.task.eval_generate = 4  # greedy exact match on 4 test records after training
    a = train_and_evaluate(config, str(tmp_path / "a"))
    assert a["format"] == "instruction" and a["task"] == f"jsonl:{jsonl}"
    assert a["metrics"]["test"]["exact_match_n"] == 4 and 0 <= a["metrics"]["test"]["exact_match"] <= 1
    val = [r["loss"] for r in rows(tmp_path / "a", "validation")]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, val  # response-token loss on held-out records
    assert a["metrics"]["test"]["perplexity"] == pytest.approx(np.exp(a["metrics"]["test"]["loss"]), rel=1e-5)
    assert a["metrics"]["validation"]["loss"] == min(val)  # the best (lowest-loss) step is kept
    b = train_and_evaluate(config, str(tmp_path / "b"))
    assert a["metrics"] == b["metrics"]
    assert open(tmp_path / "a" / "metrics.jsonl").read() == open(tmp_path / "b" / "metrics.jsonl").read()


def test_verbaliser_classification_through_the_loop(tmp_path, monkeypatch):
    """task.format='lm' (peftjax.data.lm): a decoder classifies tweets by verbaliser likelihood."""
    texts = [(f"i {w} this flight number {i}", y) for i in range(12)
             for w, y in (("hate", 0), ("saw", 1), ("love", 2))]
    splits = {"train": texts[:24], "validation": texts[24:30], "test": texts[30:]}
    monkeypatch.setattr(tweets, "sentiment_splits", lambda seed=0, path=None: (splits, {}))
    config = tiny_decoder_config("tweet_sentiment", steps=8, learning_rate=5e-3)
    config.data_dir = str(tmp_path / "tfds")
    config.task.format = "lm"  # the Llama family also has a classification head ('auto' picks it)
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert result["format"] == "lm"
    train = [r["loss"] for r in rows(tmp_path / "run", "train")]
    assert np.mean(train[-3:]) < np.mean(train[:3]), train  # verbaliser + EOS loss
    test = result["metrics"]["test"]
    assert set(test) == {"accuracy", "macro_f1"} and 0.0 <= test["accuracy"] <= 1.0
    assert result["majority_rate"] == pytest.approx(1 / 3)


def test_greedy_exact_match_scores_generated_responses():
    """Prompts of different lengths (left-padded inside), references taken from each row's own
    unpadded greedy continuation: true references match, a changed token or a missed EOS does not."""
    from flax import traverse_util

    from peftjax import methods
    from peftjax.models import generation
    from peftjax.train.steps import greedy_exact_match
    from tests.helpers import tiny_model

    model, base = tiny_model("llama")
    method = methods.create("lora", model, {"rank": 2})
    peft = method.setup(jax.random.PRNGKey(0), base)  # B = 0: the adapted model is the base model
    params = traverse_util.unflatten_dict(base, sep=".")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 200, size=n).tolist() for n in (5, 9, 7, 6)]
    conts = [np.asarray(generation.generate(model, params, np.asarray([p], np.int32), None, 4,
                                            eos_token_id=()))[0, len(p):].tolist() for p in prompts]
    eos = next(t for t in range(5, 256) if all(t not in c for c in conts))  # never generated
    responses = [conts[0], conts[1][:3] + [conts[1][3] + 1], conts[2], conts[3][:2] + [eos]]
    n, width = len(prompts), 16
    enc = {"input_ids": np.zeros((n, width), np.int32), "attention_mask": np.zeros((n, width), np.int32),
           "labels": np.full((n, width), -100, np.int32)}
    for i, (p, r) in enumerate(zip(prompts, responses)):
        enc["input_ids"][i, :len(p) + len(r)] = p + r
        enc["attention_mask"][i, :len(p) + len(r)] = 1
        enc["labels"][i, len(p):len(p) + len(r)] = r
    got = greedy_exact_match(method, peft.trainable, peft.frozen, peft.state, enc, limit=10,
                             batch_size=3, eos_token_id=eos)
    # rows 0 and 2 match; row 1 has a changed token; row 3 expects an EOS the model never emits
    assert got == {"exact_match": 0.5, "exact_match_n": 4.0}


def test_causal_lm_loss_is_the_mean_over_response_tokens_only():
    """On encoded instruction rows, the train loss is -mean log p(response + EOS tokens), and the
    logits at prompt positions (which predict prompt tokens) do not enter it."""
    from peftjax.data import instructions as ins
    from peftjax.losses import causal_lm_loss

    class Chars:  # a character tokenizer: ids 3.. for bytes
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[3 + b for b in t.encode()] for t in texts]}

    recs = [ins.Instruction(instruction="add", input="1 2", output="3"),
            ins.Instruction(instruction="say hi", input="", output="hello")]
    enc = ins.encode_instructions(recs, Chars(), 24, ins.Template("{instruction}:{input}=", "{instruction}="),
                                  eos_token_id=2, bos_token_id=1)
    batch = {**enc, "mask": np.ones(2, bool)}
    logits = np.random.default_rng(0).normal(size=(2, 24, 300)).astype(np.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    terms = [float(logp[i, t - 1, enc["labels"][i, t]]) for i in range(2) for t in range(1, 24)
             if enc["labels"][i, t] != -100]
    assert len(terms) == (1 + 1) + (5 + 1)  # each response and its EOS
    np.testing.assert_allclose(float(causal_lm_loss(logits, batch)), -np.mean(terms), rtol=1e-5)
    start = int(np.argmax(enc["labels"][1] != -100))
    moved = logits.copy()
    moved[1, : start - 1] += 5.0 * np.random.default_rng(1).normal(size=moved[1, : start - 1].shape)
    np.testing.assert_allclose(float(causal_lm_loss(moved, batch)), float(causal_lm_loss(logits, batch)), rtol=1e-6)

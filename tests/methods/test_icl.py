"""In-context learning: seeded k-shot selection, the prompt layout (newline-separated, no EOS by
default), contextual calibration against a hand-computed numpy reference with a fake scorer, and
end-to-end prediction with a tiny random Llama (no parameter changes; k = 0 is plain verbaliser
scoring)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import models as model_configs
from peftjax.data import get_task
from peftjax.data.lm import encode_lm
from peftjax.methods.icl import (ICLConfig, calibrated_predictions, content_free_example, encode_icl, evaluate_icl,
                                  select_demonstrations)
from peftjax.methods.proxy_tuning import CausalLM, classify, lm_class_scores
from peftjax.models import build_model

V = 64
TASK = get_task("tweet_sentiment")
TEMPLATE = "T:{text_a}>"


CHARS = " :>|\nTabcdefghijklmnopqrstuvwxyz0123456789/[]NAMSK"


class CharTokenizer:
    """One id per character of CHARS (from 3); bos 1 (shown as ^), eos 2 (shown as $)."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + CHARS.index(c) for c in text]}

    def decode(self, ids):
        return "".join({1: "^", 2: "$"}.get(int(i), CHARS[int(i) - 3]) for i in ids)


def examples(n: int, offset: int = 0):
    words = ["good", "bad", "ok", "nice", "sad", "fine", "ugh", "yay"]
    return [dict(text_a=f"{words[i % 8]} {i}", text_b=None, label=i % 3, idx=offset + i) for i in range(n)]


def test_selection_is_seeded_per_example_and_without_repeats():
    labels = np.arange(30) % 3
    a = select_demonstrations(labels, 10, 4, seed=1)
    np.testing.assert_array_equal(a, select_demonstrations(labels, 10, 4, seed=1))
    np.testing.assert_array_equal(a[:5], select_demonstrations(labels, 5, 4, seed=1))  # per example
    assert not np.array_equal(a, select_demonstrations(labels, 10, 4, seed=2))
    assert all(len(set(row)) == 4 for row in a)
    fixed = select_demonstrations(labels, 6, 4, seed=1, selection="fixed")
    assert (fixed == fixed[0]).all()
    bal = select_demonstrations(labels, 20, 5, seed=0, balanced=True, num_classes=3)
    for row in bal:
        assert sorted(np.bincount(labels[row], minlength=3)) == [1, 2, 2]
    assert select_demonstrations(labels, 3, 0).shape == (3, 0)
    with pytest.raises(ValueError, match="k=31 demonstrations cannot be drawn from 30"):
        select_demonstrations(labels, 1, 31)
    with pytest.raises(ValueError, match="valid: random, fixed"):
        ICLConfig(selection="nearest")
    with pytest.raises(ValueError, match="needs 2 examples of class 2"):
        select_demonstrations([0, 0, 0, 1, 1, 1, 2], 1, 6, balanced=True, num_classes=3)


def test_prompt_layout_default_is_newline_separated_without_eos():
    tok = CharTokenizer()
    train = examples(9)
    config = ICLConfig(k=2, seed=3, template=TEMPLATE, max_demo_tokens=4, max_length=24)
    enc = encode_icl(examples(2, offset=100), train, tok, TASK, config)
    d = enc["demo_indices"]
    row = enc["cand1_input_ids"][0][enc["cand1_attention_mask"][0].astype(bool)]
    assert tok.eos_token_id not in row.tolist()
    demo = lambda e: f"T:{e['text_a'][:4]}> {TASK.label_names[e['label']]}\n\n"
    assert tok.decode(row) == "^" + demo(train[d[0, 0]]) + demo(train[d[0, 1]]) + "T:good 0> neutral"
    # The query's answer ends as the demonstrations' do: the verbaliser alone is scored.
    labels = enc["cand1_labels"][0]
    assert tok.decode(labels[labels != -100]) == " neutral"
    gold = enc["labels"][1]
    assert tok.decode(gold[gold != -100]) == " neutral"  # query 101's own label
    np.testing.assert_array_equal(enc["attention_mask"],
                                  np.maximum.reduce([enc[f"cand{c}_attention_mask"] for c in range(3)]))


def test_prompt_layout_with_eos_after_demo_is_the_earlier_one():
    tok = CharTokenizer()
    train = examples(9)
    config = ICLConfig(k=2, seed=3, template=TEMPLATE, separator="|", eos_after_demo=True, max_demo_tokens=4,
                       max_length=24)
    enc = encode_icl(examples(2, offset=100), train, tok, TASK, config)
    d = enc["demo_indices"]
    assert d.shape == (2, 2)
    row = enc["cand1_input_ids"][0][enc["cand1_attention_mask"][0].astype(bool)]
    demo = lambda e: f"T:{e['text_a'][:4]}> {TASK.label_names[e['label']]}$|"
    want = "^" + demo(train[d[0, 0]]) + demo(train[d[0, 1]]) + "T:good 0> neutral$"
    assert tok.decode(row) == want
    # The loss/score covers the verbaliser and EOS only.
    labels = enc["cand1_labels"][0]
    assert tok.decode(labels[labels != -100]) == " neutral$"


# --- contextual calibration ------------------------------------------------------------------

WORDS = TASK.label_names
CF_BIAS = {"N/A": [0.0, 0.3, 4.0], "": [0.2, 0.0, 3.6], "[MASK]": [0.4, 0.1, 4.4]}


def fake_scores(demo_counts, query: str) -> np.ndarray:
    """A fake LM's (K,) verbaliser log-likelihoods: biased toward class 2, plus a majority-label
    bias (0.4 per demonstration of a class) and, for real queries, a content signal."""
    base = np.asarray(CF_BIAS[query]) if query in CF_BIAS else (
        np.asarray([sum(map(ord, query)) % 5, sum(map(ord, query)) % 3, 0.0]) * 0.7 + [0.0, 0.0, 4.5])
    return base + 0.4 * np.asarray(demo_counts, np.float64)


def fake_lm(tok, calls, uniform_cf=False):
    """A scoring function over candidate batches that reads the prompt back as text; it records
    the query of every real (unpadded) row in ``calls``. ``uniform_cf``: content-free queries
    score every class alike."""
    def score(batch):
        rows = []
        for ids, mask, real in zip(batch["cand0_input_ids"], batch["cand0_attention_mask"], batch["mask"]):
            text = tok.decode(np.asarray(ids)[np.asarray(mask, bool)])
            head, query = text[:text.rindex("T:")], text[text.rindex("T:") + 2:]
            query = query[:query.rindex(">")]
            if real:
                calls.append(query)
            s = fake_scores([head.count(f"> {w}") for w in WORDS], query)
            rows.append(np.zeros(3) if uniform_cf and query in CF_BIAS else s)
        return np.stack(rows)
    return score


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def hand_calibration(out, train, test, cf_strings=("N/A", "", "[MASK]")):
    labels = np.asarray([e["label"] for e in train])
    p, p_cf = [], []
    for i, e in enumerate(test):
        counts = np.bincount(labels[out["demo_indices"][i]], minlength=3)
        p.append(softmax(fake_scores(counts, e["text_a"])))
        cf = np.mean([softmax(fake_scores(counts, u)) for u in cf_strings], axis=0)
        p_cf.append(cf / cf.sum())
    return np.asarray(p), np.asarray(p_cf)


def test_contextual_calibration_matches_numpy_reference():
    tok, train, test = CharTokenizer(), examples(12), examples(10, offset=50)
    base = dict(k=3, seed=1, template=TEMPLATE, max_demo_tokens=4, max_length=24)
    plain = evaluate_icl(fake_lm(tok, []), tok, TASK, train, test, ICLConfig(**base), batch_size=4)
    calls: list[str] = []
    out = evaluate_icl(fake_lm(tok, calls), tok, TASK, train, test, ICLConfig(**base, calibration="contextual"),
                       batch_size=4)
    p, p_cf = hand_calibration(out, train, test)
    np.testing.assert_allclose(out["class_probs"], p, rtol=1e-6)
    np.testing.assert_allclose(out["p_cf"], p_cf, rtol=1e-6)
    np.testing.assert_allclose(out["p_cf_mean"], p_cf.mean(0), rtol=1e-6)
    want = np.argmax(p / p_cf, axis=-1)
    np.testing.assert_array_equal(out["predictions"], want)
    # The uncalibrated prediction is the biased one, and calibration does move it.
    np.testing.assert_array_equal(out["uncalibrated_predictions"], np.argmax(p, -1))
    np.testing.assert_array_equal(plain["predictions"], np.argmax(p, -1))
    assert (np.argmax(p, -1) == 2).all() and len(set(want)) > 1
    assert plain["p_cf"] is None and plain["content_free_prompts"] == 0
    # Random selection: one content-free prompt per string and per query (its own demonstrations).
    assert out["content_free_prompts"] == 3 * len(test)
    assert sorted(set(calls) - {e["text_a"] for e in test}) == ["", "N/A", "[MASK]"]
    assert len({tuple(r) for r in np.round(out["p_cf"], 9)}) > 1


def test_uniform_content_free_probabilities_leave_predictions_unchanged():
    tok, train, test = CharTokenizer(), examples(12), examples(10, offset=50)
    config = ICLConfig(k=2, template=TEMPLATE, max_demo_tokens=4, max_length=24, calibration="contextual")
    out = evaluate_icl(fake_lm(tok, [], uniform_cf=True), tok, TASK, train, test, config, batch_size=4)
    np.testing.assert_allclose(out["p_cf"], np.full((10, 3), 1 / 3))
    np.testing.assert_array_equal(out["predictions"], out["uncalibrated_predictions"])
    scores = np.random.default_rng(0).normal(size=(20, 3)) * 3
    np.testing.assert_array_equal(calibrated_predictions(scores, np.log(np.full(3, 1 / 3))), scores.argmax(-1))


def test_fixed_selection_computes_p_cf_once():
    tok, train, test = CharTokenizer(), examples(12), examples(10, offset=50)
    calls: list[str] = []
    config = ICLConfig(k=3, seed=2, selection="fixed", template=TEMPLATE, max_demo_tokens=4, max_length=24,
                       calibration="contextual")
    out = evaluate_icl(fake_lm(tok, calls), tok, TASK, train, test, config, batch_size=4)
    assert out["content_free_prompts"] == 3
    assert sorted(c for c in calls if c in CF_BIAS) == ["", "N/A", "[MASK]"]
    assert (out["p_cf"] == out["p_cf"][0]).all()
    p, p_cf = hand_calibration(out, train, test)
    np.testing.assert_allclose(out["p_cf"], p_cf, rtol=1e-6)
    np.testing.assert_array_equal(out["predictions"], np.argmax(p / p_cf, axis=-1))


def test_config_errors():
    with pytest.raises(ValueError, match="valid: none, contextual"):
        ICLConfig(calibration="batch")
    with pytest.raises(ValueError, match="at least one content-free string"):
        ICLConfig(calibration="contextual", content_free=())
    with pytest.raises(TypeError, match="sequence of strings"):
        ICLConfig(content_free="N/A")
    assert ICLConfig(content_free=["N/A"]).content_free == ("N/A",)
    assert content_free_example("N/A")["text_a"] == "N/A"


def test_icl_predicts_end_to_end_and_k0_is_plain_scoring():
    hf = {**model_configs.get("tiny-llama").hf_config.to_dict(), "vocab_size": V, "initializer_range": 0.3,
          "bos_token_id": 1, "eos_token_id": 2}
    model = build_model(hf, head="causal_lm")
    lm = CausalLM.plain(model, model.init(jax.random.PRNGKey(0)))
    before = jax.tree.map(np.asarray, lm.weights)
    tok, train, test = CharTokenizer(), examples(12), examples(6, offset=50)
    config = ICLConfig(k=2, seed=0, template=TEMPLATE, max_demo_tokens=4, max_length=24)
    out = evaluate_icl(lm, tok, TASK, train, test, config, batch_size=8)
    assert out["predictions"].shape == (6,) and set(out["predictions"]) <= {0, 1, 2}
    assert set(out["metrics"]) == set(TASK.metrics)
    np.testing.assert_array_equal(out["predictions"],
                                  evaluate_icl(lm, tok, TASK, train, test, config, batch_size=8)["predictions"])
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, lm.weights))
    zero = evaluate_icl(lm, tok, TASK, train, test,
                        ICLConfig(k=0, template=TEMPLATE, max_length=24, eos_after_demo=True), batch_size=8)
    plain = encode_lm(test, tok, 24, TASK, TEMPLATE, candidates=True)
    np.testing.assert_array_equal(zero["predictions"],
                                  classify(lambda b: lm_class_scores(lm, b, 3), plain, 8))
    # Contextual calibration with the real model: p_cf is the class softmax of the same
    # demonstrations followed by each content-free query, averaged.
    cal = ICLConfig(k=2, seed=0, selection="fixed", template=TEMPLATE, max_demo_tokens=4, max_length=24,
                    calibration="contextual")
    out = evaluate_icl(lm, tok, TASK, train, test, cal, batch_size=8)
    probs = [softmax(np.asarray(lm_class_scores(lm, encode_icl([content_free_example(u)], train, tok, TASK, cal),
                                                3), np.float64))[0] for u in cal.content_free]
    p_cf = np.mean(probs, axis=0)
    np.testing.assert_allclose(out["p_cf"], np.tile(p_cf / p_cf.sum(), (6, 1)), rtol=1e-5)
    np.testing.assert_array_equal(out["predictions"], np.argmax(out["class_probs"] / out["p_cf"], axis=-1))

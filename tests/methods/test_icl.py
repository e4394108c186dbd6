"""In-context learning: seeded k-shot selection, the prompt layout, end-to-end prediction with a
tiny random Llama (no parameter changes; k = 0 is plain verbaliser scoring)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import models as model_configs
from peftjax.data import get_task
from peftjax.data.lm import encode_lm
from peftjax.methods.icl import ICLConfig, encode_icl, evaluate_icl, select_demonstrations
from peftjax.methods.proxy_tuning import CausalLM, classify, lm_class_scores
from peftjax.models import build_model

V = 64
TASK = get_task("tweet_sentiment")
TEMPLATE = "T:{text_a}>"


CHARS = " :>|\nTabcdefghijklmnopqrstuvwxyz0123456789"


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


def test_prompt_layout():
    tok = CharTokenizer()
    train = examples(9)
    config = ICLConfig(k=2, seed=3, template=TEMPLATE, separator="|", max_demo_tokens=4, max_length=24)
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
    zero = evaluate_icl(lm, tok, TASK, train, test, ICLConfig(k=0, template=TEMPLATE, max_length=24),
                        batch_size=8)
    plain = encode_lm(test, tok, 24, TASK, TEMPLATE, candidates=True)
    np.testing.assert_array_equal(zero["predictions"],
                                  classify(lambda b: lm_class_scores(lm, b, 3), plain, 8))

"""Proxy-tuning on tiny random Llamas: α = 0 and identical small models reduce to the base model,
the KV-cached combined generation equals full recomputation, sampling is seeded, a PEFT expert
runs through its hooks, classes are predicted end to end, bad combinations are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.data import get_task
from peftjax.data.lm import encode_lm
from peftjax.methods.proxy_tuning import (CausalLM, check_compatible, classify, combine_logits,
                                          lm_class_scores, proxy_class_scores, proxy_generate,
                                          proxy_logits)
from peftjax.models import build_model, generation

NEW = 5
BASE_V, SMALL_V = 96, 100  # the small models carry 4 extra tokens at the end (truncated away)


def _llama(vocab: int, hidden: int, layers: int):
    hf = {**model_configs.get("tiny-llama").hf_config.to_dict(), "vocab_size": vocab,
          "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
          "initializer_range": 0.3, "bos_token_id": 1, "eos_token_id": 2}
    return build_model(hf, head="causal_lm")


@pytest.fixture(scope="module")
def models():
    base_model = _llama(BASE_V, 48, 2)
    small_model = _llama(SMALL_V, 32, 1)
    base = CausalLM.plain(base_model, base_model.init(jax.random.PRNGKey(0)))
    tuned = CausalLM.plain(small_model, small_model.init(jax.random.PRNGKey(1)))
    untuned = CausalLM.plain(small_model, small_model.init(jax.random.PRNGKey(2)))
    return base, tuned, untuned


def _prompt():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, BASE_V, (3, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.slow   # ~7 s; make test-all (make test keeps inside its CI budget)
def test_alpha_zero_is_the_base_model(models):
    base, tuned, untuned = models
    ids, mask = _prompt()
    want = generation.generate(base.model, base.weights, ids, mask, NEW, eos_token_id=())
    got = proxy_generate(base, tuned, untuned, ids, mask, NEW, alpha=0.0, eos_token_id=())
    np.testing.assert_array_equal(got, want)
    kw = dict(temperature=2.0, top_p=0.95, rng=jax.random.PRNGKey(3), eos_token_id=())
    np.testing.assert_array_equal(
        proxy_generate(base, tuned, untuned, ids, mask, NEW, alpha=0.0, **kw),
        generation.generate(base.model, base.weights, ids, mask, NEW, **kw))
    np.testing.assert_allclose(proxy_logits(base, tuned, untuned, ids, mask, alpha=0.0),
                               base.model.module.apply({"params": base.weights}, ids, mask), atol=1e-5)


def test_identical_small_models_give_the_base_model(models):
    base, tuned, untuned = models
    ids, mask = _prompt()
    same = CausalLM.plain(tuned.model, tuned.weights)
    want = generation.generate(base.model, base.weights, ids, mask, NEW, eos_token_id=())
    got = proxy_generate(base, tuned, same, ids, mask, NEW, alpha=1.0, eos_token_id=())
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(proxy_logits(base, tuned, same, ids, mask, alpha=2.0),
                                  proxy_logits(base, tuned, untuned, ids, mask, alpha=0.0))


def test_combination_truncates_to_the_base_vocabulary(models):
    base, tuned, untuned = models
    ids, mask = _prompt()
    fwd = lambda lm: np.asarray(lm.model.module.apply({"params": lm.weights}, ids, mask))
    b, t, u = fwd(base), fwd(tuned), fwd(untuned)
    assert t.shape[-1] == SMALL_V and b.shape[-1] == BASE_V
    got = np.asarray(proxy_logits(base, tuned, untuned, ids, mask, alpha=0.5))
    np.testing.assert_allclose(got, b + 0.5 * (t[..., :BASE_V] - u[..., :BASE_V]), atol=1e-5)
    assert got.shape == (3, 6, BASE_V)


def test_cached_proxy_generation_equals_recomputation(models):
    """Greedy: each step's token is the argmax of the combined full-recomputation logits."""
    base, tuned, untuned = models
    ids, mask = _prompt()
    got = np.asarray(proxy_generate(base, tuned, untuned, ids, mask, NEW, alpha=1.0, eos_token_id=()))
    assert got.shape == (3, 6 + NEW)
    np.testing.assert_array_equal(got, _recompute_greedy(base, tuned, untuned, ids, mask))
    # The steering changes what is generated (otherwise the test above would prove little).
    plain = np.asarray(generation.generate(base.model, base.weights, ids, mask, NEW, eos_token_id=()))
    assert not np.array_equal(got, plain)


def _recompute_greedy(base, tuned, untuned, ids, mask, alpha=1.0):
    """Greedy proxy decoding by full recomputation on a fixed buffer (the reference for the caches)."""
    b, l = ids.shape
    buf = np.concatenate([ids, np.zeros((b, NEW), np.int32)], 1)
    mbuf = np.concatenate([mask, np.zeros((b, NEW), np.int32)], 1)
    for t in range(NEW):
        logits = np.asarray(proxy_logits(base, tuned, untuned, buf, mbuf, alpha=alpha))[:, l - 1 + t]
        buf[:, l + t] = logits.argmax(-1)
        mbuf[:, l + t] = 1
    return buf


def test_prompt_tuning_expert_with_its_own_grown_cache(models):
    """A prompt-tuning expert prepends virtual tokens: its cache grows, the others' do not."""
    base, _, untuned = models
    pt = methods.create("prompt_tuning", untuned.model, {"num_virtual_tokens": 3, "init": "vocab"})
    peft = pt.setup(jax.random.PRNGKey(0), traverse_util.flatten_dict(untuned.weights, sep="."))
    trainable = {**peft.trainable, "added": {k: v + 0.3 for k, v in peft.trainable["added"].items()}}
    expert = CausalLM.adapted(pt, trainable, peft.frozen, peft.state)
    ids, mask = _prompt()
    got = np.asarray(proxy_generate(base, expert, untuned, ids, mask, NEW, eos_token_id=()))
    np.testing.assert_array_equal(got, _recompute_greedy(base, expert, untuned, ids, mask))


def test_sampling_is_deterministic_for_a_seed(models):
    base, tuned, untuned = models
    ids, mask = _prompt()
    kw = dict(alpha=1.0, temperature=2.0, top_p=0.95, eos_token_id=())
    a = proxy_generate(base, tuned, untuned, ids, mask, NEW, rng=jax.random.PRNGKey(5), **kw)
    b = proxy_generate(base, tuned, untuned, ids, mask, NEW, rng=jax.random.PRNGKey(5), **kw)
    c = proxy_generate(base, tuned, untuned, ids, mask, NEW, rng=jax.random.PRNGKey(6), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="needs an rng"):
        proxy_generate(base, tuned, untuned, ids, mask, NEW, temperature=1.0)


class _CharTokenizer:
    """Characters to ids 3..BASE_V-1; bos 1 / eos 2 (just enough of a tokenizer for encode_lm)."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % (BASE_V - 3) for c in text]}


def _examples(n: int = 6):
    texts = ["good day", "bad news", "fine", "awful", "lovely thing", "meh ok"]
    return [dict(text_a=texts[i % len(texts)], text_b=None, label=i % 3, idx=i) for i in range(n)]


def test_lora_expert_through_its_hooks_and_class_prediction(models):
    base, _, untuned = models
    lora = methods.create("lora", untuned.model, {"rank": 2, "alpha": 4.0})
    flat = traverse_util.flatten_dict(untuned.weights, sep=".")
    peft = lora.setup(jax.random.PRNGKey(0), flat)
    added = {k: (v + 0.5 if k.endswith("lora_B") else v) for k, v in peft.trainable["added"].items()}
    trainable = {**peft.trainable, "added": added}
    expert = CausalLM.adapted(lora, trainable, peft.frozen, peft.state)
    ids, mask = _prompt()
    b = base.model.module.apply({"params": base.weights}, ids, mask)
    t = lora.apply(trainable, peft.frozen, peft.state, {"input_ids": ids, "attention_mask": mask})
    u = untuned.model.module.apply({"params": untuned.weights}, ids, mask)
    np.testing.assert_allclose(proxy_logits(base, expert, untuned, ids, mask),
                               combine_logits(b, t, u), atol=1e-5)
    assert proxy_generate(base, expert, untuned, ids, mask, NEW).shape == (3, 6 + NEW)

    task = get_task("tweet_sentiment")
    encoded = encode_lm(_examples(), _CharTokenizer(), 32, task, "T: {text_a} S:", candidates=True)
    preds = classify(lambda batch: proxy_class_scores(base, expert, untuned, batch, 3), encoded, 4)
    assert preds.shape == (6,) and set(preds) <= {0, 1, 2}
    batch = {k: v[:4] for k, v in encoded.items()}
    # α = 0: the proxy scores are the base model's own verbaliser log-likelihoods.
    np.testing.assert_allclose(proxy_class_scores(base, expert, untuned, batch, 3, alpha=0.0),
                               lm_class_scores(base, batch, 3), atol=1e-5)


def test_incompatible_models_are_refused(models):
    base, tuned, untuned = models
    narrow = _llama(BASE_V - 8, 32, 1)
    small = CausalLM.plain(narrow, narrow.init(jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="incompatible vocabularies: the tuned small model has 88"):
        check_compatible(base, small, untuned)
    hf = {**model_configs.get("tiny-llama").hf_config.to_dict(), "vocab_size": SMALL_V}
    classifier = build_model(hf, head="classification", num_labels=3)
    with pytest.raises(ValueError, match="needs causal LMs.*'classification'"):
        CausalLM.plain(classifier, {})
    bert = build_model(model_configs.get("tiny-bert").hf_config.to_dict(), head="classification",
                       num_labels=2)
    with pytest.raises(ValueError, match="bert family has none"):
        proxy_logits((bert, {}), tuned, untuned, np.ones((1, 3), np.int32))

    class Tok:
        def __init__(self, names):
            self.names = names

        def __len__(self):
            return len(self.names)

        def convert_ids_to_tokens(self, ids):
            return [self.names[i] for i in ids]

    names = [f"t{i}" for i in range(SMALL_V)]
    swapped = list(names)
    swapped[7], swapped[8] = swapped[8], swapped[7]
    assert check_compatible(base, tuned, untuned, (Tok(names), Tok(names + ["x"]), Tok(names))) == BASE_V
    with pytest.raises(ValueError, match="untuned model's tokenizer differs .* at id 7"):
        check_compatible(base, tuned, untuned, (Tok(names), Tok(names), Tok(swapped)))
    with pytest.raises(ValueError, match="fewer than the base vocabulary"):
        combine_logits(jnp.zeros((1, 10)), jnp.zeros((1, 8)), jnp.zeros((1, 10)))

"""``pooling`` of encoder classification heads: ``cls`` (transformers' head) and ``mean``.

``mean`` is sentence-transformers' ``Pooling(pooling_mode_mean_tokens)``:
``sum_t h_t m_t / max(sum_t m_t, 1e-9)`` over the last hidden states, then the classifier. The
checks: it equals that formula computed by hand (and by PyTorch on the real all-MiniLM-L6-v2
weights), padding never changes it, the model holds no pooler, prompt tuning's virtual tokens
are averaged too, and unknown or unsupported poolings are refused. ``cls`` parity with
transformers is tests/models/test_bert.py (unchanged).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import models as model_configs
from peftjax import methods
from peftjax.models import bert, build_model, hf_io
from peftjax.models.registry import head_description


def _hf(kind: str) -> dict:
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_act="gelu", max_position_embeddings=40,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "roberta":
        return dict(model_type="roberta", type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                    **common)
    return dict(model_type="bert", type_vocab_size=2, pad_token_id=0, **common)


def _perturbed(model, seed: int = 0) -> dict:
    """Random params with every leaf moved off its init (biases and LayerNorms too)."""
    params = model.init(jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(tree, [x + 0.2 * rs.standard_normal(x.shape).astype(np.float32)
                                     for x in leaves])


def _batch(kind: str, lengths=(6, 3, 8, 1), seq: int = 8, seed: int = 1) -> dict:
    rs = np.random.RandomState(seed)
    pad = 1 if kind == "roberta" else 0
    ids = np.full((len(lengths), seq), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rs.randint(3, 100, n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(model, params, batch):
    """Last hidden states and effective mask of the model's encoder (no pooler)."""
    c = model.config
    enc = bert.BertModel(c, add_pooling_layer=False)
    h, _, mask = enc.apply({"params": params[c.model_type]}, batch["input_ids"],
                           batch["attention_mask"], batch.get("token_type_ids"), False)
    return np.asarray(h), np.asarray(mask)


def _hand_mean(h, mask):
    m = mask.astype(np.float64)[..., None]
    return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_mean_head_equals_hand_computed_masked_mean(kind):
    model = build_model(_hf(kind), head="classification", num_labels=3, pooling="mean")
    params = _perturbed(model)
    batch = _batch(kind)
    logits = np.asarray(model.apply(params, batch))
    h, mask = _hidden(model, params, batch)
    np.testing.assert_array_equal(mask, batch["attention_mask"])
    pooled = _hand_mean(h, mask)
    head = params["classifier"]
    if kind == "bert":
        expect = pooled @ head["kernel"] + head["bias"]
    else:  # RoBERTa keeps its head's dense + tanh, fed the mean instead of <s>
        x = np.tanh(pooled @ head["dense"]["kernel"] + head["dense"]["bias"])
        expect = x @ head["out_proj"]["kernel"] + head["out_proj"]["bias"]
    print(f"\n{kind} mean head vs hand: max|d| {np.abs(logits - expect).max():.3g}")
    np.testing.assert_allclose(logits, expect, atol=1e-5, rtol=1e-5)
    # Not the first-token head: the mean of the whole row differs from row 0's [CLS]/<s> state.
    assert np.abs(pooled - h[:, 0]).max() > 1e-2


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_padding_does_not_change_mean_pooling(kind):
    model = build_model(_hf(kind), head="classification", num_labels=3, pooling="mean")
    params = _perturbed(model, seed=2)
    short = _batch(kind, lengths=(5, 8, 2), seq=8)
    pad = 1 if kind == "roberta" else 0
    long = {k: np.pad(v, ((0, 0), (0, 8)), constant_values=pad if k == "input_ids" else 0)
            for k, v in short.items()}
    a = np.asarray(model.apply(params, short))
    b = np.asarray(model.apply(params, long))  # the same rows padded to 16 tokens
    np.testing.assert_allclose(a, b, atol=1e-5)
    # A padding row (all mask 0) is finite (the 1e-9 floor) and does not change the others.
    extra = {k: np.concatenate([v, np.full((1, 8), pad if k == "input_ids" else 0, np.int32)])
             for k, v in short.items()}
    c = np.asarray(model.apply(params, extra))
    assert np.isfinite(c).all()
    np.testing.assert_allclose(c[:3], a, atol=1e-5)


def test_mean_model_has_no_pooler_and_head_is_the_classifier():
    cls = build_model(_hf("bert"), head="classification", num_labels=3)
    mean = build_model(_hf("bert"), head="classification", num_labels=3, pooling="mean")
    flat = lambda m: hf_io.flatten(m.abstract_params())
    assert cls.pooling == "cls" and mean.pooling == "mean"
    assert any(".pooler." in p for p in flat(cls))
    assert not any("pooler" in p for p in flat(mean))
    assert set(flat(cls)) - set(flat(mean)) == {"bert.pooler.dense.kernel", "bert.pooler.dense.bias"}
    for m in (cls, mean):
        assert m.head_prefixes == ("classifier",)
        d = head_description(m)
        assert d["pooling"] == m.pooling
        assert d["head"] == {"params": ["classifier.bias", "classifier.kernel"], "count": 32 * 3 + 3}
    rob = build_model(_hf("roberta"), head="classification", num_labels=3, pooling="mean")
    assert head_description(rob)["head"]["params"] == [
        "classifier.dense.bias", "classifier.dense.kernel", "classifier.out_proj.bias",
        "classifier.out_proj.kernel"]
    # A decoder's head is fixed (last token): no pooling reported, its params still listed.
    llama = build_model(model_configs.get("tiny-llama").hf_config, head="classification", num_labels=3)
    assert head_description(llama) == {"pooling": None,
                                       "head": {"params": ["score.kernel"], "count": 32 * 3}}


def test_a_checkpoint_with_pooler_loads_into_a_mean_model():
    cls = build_model(_hf("bert"), head="classification", num_labels=3)
    tensors = hf_io.tensors_from_params(_perturbed(cls))
    assert "bert.pooler.dense.weight" in tensors
    mean = build_model(_hf("bert"), head="classification", num_labels=3, pooling="mean")
    params, fresh = hf_io.params_from_tensors(mean, tensors)
    assert fresh == [] and "pooler" not in params["bert"]


def test_prompt_tuning_mean_averages_the_virtual_tokens():
    """The choice: virtual tokens are part of the sequence the encoder reads (BertModel returns
    the extended mask), so the mean runs over them too, as the ``cls`` head reads the first
    virtual token (HF PEFT's behaviour for prompt tuning on BERT)."""
    model = build_model(_hf("bert"), head="classification", num_labels=3, pooling="mean")
    base = hf_io.flatten(_perturbed(model))
    n = 4
    method = methods.create("prompt_tuning", model, {"num_virtual_tokens": n, "init": "random"})
    peft = method.setup(jax.random.PRNGKey(0), base)
    batch = _batch("bert", lengths=(6, 3, 8), seq=8)
    # The encoder's own output (hidden states over the extended sequence, effective mask).
    logits, inter = method.apply(peft.trainable, peft.frozen, peft.state, batch,
                                 capture_intermediates=lambda mdl, _: mdl.name == "bert",
                                 mutable=["intermediates"])
    logits = np.asarray(logits)
    h, pooler, mask = inter["intermediates"]["bert"]["__call__"][0]
    h, mask = np.asarray(h), np.asarray(mask)
    assert pooler is None
    assert h.shape[1] == 8 + n
    np.testing.assert_array_equal(mask[:, :n], 1)
    np.testing.assert_array_equal(mask[:, n:], batch["attention_mask"])
    head = peft.trainable["head"]
    expect = _hand_mean(h, mask) @ head["classifier.kernel"] + head["classifier.bias"]
    np.testing.assert_allclose(logits, expect, atol=1e-5)
    real_only = _hand_mean(h[:, n:], mask[:, n:]) @ head["classifier.kernel"] + head["classifier.bias"]
    assert np.abs(logits - real_only).max() > 1e-3  # the virtual tokens do count


def test_minilm_mean_matches_pytorch_sentence_embedding(minilm_folder):
    """On the real all-MiniLM-L6-v2 weights, the pooled vector is what sentence-transformers'
    Pooling computes from transformers' BertModel (its 1_Pooling config says mean tokens)."""
    with open(os.path.join(minilm_folder, "1_Pooling", "config.json")) as f:
        assert json.load(f)["pooling_mode_mean_tokens"] is True
    model, params = hf_io.load_pretrained(minilm_folder, head="classification", num_labels=3,
                                          pooling="mean")
    assert "pooler" not in params["bert"]
    tok = hf_io.load_tokenizer(minilm_folder)
    enc = tok(["the service was great", "never again, what a waste of an evening", "ok"],
              padding=True, return_tensors="np")
    batch = {k: np.asarray(v, np.int32) for k, v in enc.items()}
    h, mask = _hidden(model, params, batch)
    ours = np.asarray(bert.masked_mean(h, mask))
    tm = transformers.BertModel.from_pretrained(minilm_folder).eval()
    with torch.no_grad():
        t = tm(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}).last_hidden_state
        m = torch.from_numpy(batch["attention_mask"]).unsqueeze(-1).expand(t.size()).float()
        ref = (torch.sum(t * m, 1) / torch.clamp(m.sum(1), min=1e-9)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # The logits are the classifier on exactly that vector.
    logits = np.asarray(model.apply(params, batch))
    np.testing.assert_allclose(logits, ours @ params["classifier"]["kernel"] + params["classifier"]["bias"],
                               atol=1e-5)


def test_pooling_errors_say_what_is_valid():
    with pytest.raises(ValueError, match="unknown pooling 'max'; valid poolings: cls, mean"):
        build_model(_hf("bert"), head="classification", num_labels=3, pooling="max")
    for name in ("tiny-llama", "tiny-t5"):
        cfg = model_configs.get(name)
        head = "causal_lm" if name == "tiny-llama" else "seq2seq_lm"
        with pytest.raises(ValueError, match="has no pooling='mean'.*offered by: bert"):
            build_model(cfg.hf_config, head=head, pooling="mean")
    cfg = model_configs.get("tiny-bert")
    assert cfg.pooling == "cls"
    cfg.pooling = "mean"
    model, params, _ = hf_io.load_from_config(cfg, head="classification", num_labels=3,
                                              with_tokenizer=False)
    assert model.pooling == "mean" and "pooler" not in params["bert"]
    cfg.pooling = "avg"
    with pytest.raises(ValueError, match="unknown pooling 'avg'"):
        hf_io.load_from_config(cfg, head="classification", num_labels=3, with_weights=False,
                               with_tokenizer=False)


def test_result_json_states_pooling_and_head(tmp_path):
    from configs.train import get_config
    from peftjax.train import train_and_evaluate

    config = get_config("model=tiny-bert,method=lora,task=tweet_sentiment")
    config.data_dir = str(tmp_path / "tfds")
    config.model.pooling = "mean"
    for k, v in dict(steps=2, batch_size=8, eval_batch_size=16, train_limit=16, eval_limit=16,
                     eval_every=2, checkpoint_every=2, log_every=1, progress=False).items():
        config.train[k] = v
    train_and_evaluate(config, str(tmp_path / "run"))
    result = json.load(open(tmp_path / "run" / "result.json"))
    assert result["pooling"] == "mean"
    assert result["head"] == {"params": ["classifier.bias", "classifier.kernel"], "count": 32 * 3 + 3}
    assert result["head"]["count"] == result["head_params"]

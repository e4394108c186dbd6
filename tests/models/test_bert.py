"""The encoder family (BERT / RoBERTa / MiniLM) against transformers' PyTorch implementation.

Why PyTorch parity is the acceptance test: every PEFT number this project reports is only
comparable with the literature if the frozen backbone computes exactly what the published
checkpoint computes. The real all-MiniLM-L6-v2 weights are run on a padded batch of real tweets
(so padding, attention masking and the pooler are all exercised) and compared to
``transformers.BertModel``; the heads are compared on tiny random checkpoints written by
transformers itself, so their names and layouts are transformers', not ours.

Models are loaded once per module (module-scoped fixtures) to keep the file at a few seconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from peftjax import data
from peftjax.methods import Sites
from peftjax.models import build_model, hf_io

TOL = 1e-4


# --------------------------------------------------------------------------- fixtures
# (minilm_folder and minilm come from tests/models/conftest.py)


@pytest.fixture(scope="module")
def torch_minilm(minilm_folder):
    return transformers.BertModel.from_pretrained(minilm_folder).eval()


@pytest.fixture(scope="module")
def tweet_batch(minilm_folder, tmp_path_factory) -> dict[str, np.ndarray]:
    """16 real tweets of the tweet_sentiment test split, padded to the longest (padding=True)."""
    data_dir = str(tmp_path_factory.mktemp("tweets"))
    examples = data.load_examples("tweet_sentiment", "test", data_dir=data_dir, limit=16)
    tokenizer = hf_io.load_tokenizer(minilm_folder)
    enc = tokenizer([e["text_a"] for e in examples], padding=True, return_tensors="np")
    batch = {k: np.asarray(v, np.int32) for k, v in enc.items()}
    lengths = batch["attention_mask"].sum(1)
    # The batch must really be padded: several distinct lengths, and real padding in most rows.
    assert len(set(lengths.tolist())) >= 8, lengths
    assert (lengths < batch["input_ids"].shape[1]).sum() >= 8, lengths
    return batch


def _module_outputs(model, params, batch):
    """The bare encoder module's full output: (last hidden states, pooler output, mask)."""
    return model.module.apply({"params": params}, *[batch.get(n) for n in model.input_names],
                              train=False)


# --------------------------------------------------------------------------- parity: real weights


@pytest.fixture(scope="module")
def minilm_outputs(minilm, tweet_batch):
    """``m.apply(params, batch)`` (the last hidden states) and the pooler output, one compile."""
    model, params = minilm
    both = jax.jit(lambda p, b: (model.apply(p, b), _module_outputs(model, p, b)))
    hidden, (full_hidden, pooled, mask) = both(params, tweet_batch)
    np.testing.assert_array_equal(np.asarray(hidden), np.asarray(full_hidden))
    return np.asarray(hidden), np.asarray(pooled), np.asarray(mask)


@pytest.fixture(scope="module")
def torch_minilm_outputs(torch_minilm, tweet_batch):
    with torch.no_grad():
        out = torch_minilm(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in tweet_batch.items()})
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_minilm_matches_pytorch_on_padded_real_tweets(minilm_outputs, torch_minilm_outputs, tweet_batch):
    hidden, pooled, mask = minilm_outputs
    t_hidden, t_pooled = torch_minilm_outputs
    assert hidden.shape == t_hidden.shape == tweet_batch["input_ids"].shape + (384,)
    valid = tweet_batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(mask, tweet_batch["attention_mask"])  # no hook changed the sequence
    diff = np.abs(hidden - t_hidden)
    d_valid, d_all = float(diff[valid].max()), float(diff.max())
    d_pool = float(np.abs(pooled - t_pooled).max())
    print(f"\nMiniLM parity on {valid.shape[0]} tweets (seq {valid.shape[1]}): max|d| "
          f"non-padded {d_valid:.3g}, all positions {d_all:.3g}, pooler {d_pool:.3g}")
    assert d_valid <= TOL
    assert d_all <= TOL
    assert d_pool <= TOL
    # Not vacuous: the activations are O(1), so 1e-4 is a tight relative bound.
    assert np.abs(t_hidden[valid]).max() > 1.0


# --------------------------------------------------------------------------- bf16


def test_bf16_loading(minilm_folder, tweet_batch, minilm_outputs):
    model, params = hf_io.load_pretrained(minilm_folder, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(params)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    hidden = np.asarray(jax.jit(model.apply)(params, tweet_batch), np.float32)
    valid = tweet_batch["attention_mask"].astype(bool)
    err = float(np.abs(hidden - minilm_outputs[0])[valid].max())
    print(f"\nbf16 weights vs fp32: max|d| {err:.3g}")
    assert err <= 5e-2
    assert err > 0  # the weights really were rounded


# --------------------------------------------------------------------------- heads: tiny random HF checkpoints


def _tiny_hf_config(kind: str, num_labels: int) -> transformers.PretrainedConfig:
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, num_labels=num_labels, hidden_act="gelu")
    if kind == "roberta":
        return transformers.RobertaConfig(max_position_embeddings=40, type_vocab_size=1,
                                          pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                          layer_norm_eps=1e-5, **common)
    return transformers.BertConfig(max_position_embeddings=40, type_vocab_size=2, pad_token_id=0,
                                   **common)


_TORCH_CLASSES = {
    ("bert", "head"): transformers.BertForSequenceClassification,
    ("roberta", "head"): transformers.RobertaForSequenceClassification,
    ("bert", "none"): transformers.BertModel,
    ("roberta", "none"): transformers.RobertaModel,
}


def _tiny_torch(kind: str, num_labels: int = 2, bare: bool = False, seed: int = 0):
    """A tiny transformers model whose every weight is perturbed (LayerNorms and biases too)."""
    torch.manual_seed(seed)
    model = _TORCH_CLASSES[(kind, "none" if bare else "head")](_tiny_hf_config(kind, num_labels))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _padded_batch(kind: str, lengths=(11, 7, 4, 11, 9), seq: int = 11, left_pad_rows=()) -> dict:
    """Random ids (never the pad id) with padding; rows in ``left_pad_rows`` are left-padded."""
    rng = np.random.default_rng(1)
    pad = 1 if kind == "roberta" else 0
    ids = np.full((len(lengths), seq), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        lo = seq - n if i in left_pad_rows else 0
        ids[i, lo:lo + n] = rng.integers(3, 100, n)
        mask[i, lo:lo + n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        tt = np.zeros_like(ids)
        tt[:, 5:] = 1  # a "pair": exercises the token-type table
        batch["token_type_ids"] = tt * mask
    return batch


def _torch_inputs(batch: dict) -> dict:
    return {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}


@pytest.mark.parametrize("kind,head,num_labels", [
    ("bert", "classification", 3),
    ("bert", "regression", 1),
    ("roberta", "classification", 3),
    ("roberta", "regression", 1),
])
def test_sequence_head_matches_pytorch(kind, head, num_labels, tmp_path):
    tm = _tiny_torch(kind, num_labels)
    tm.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    model, params = hf_io.load_pretrained(str(tmp_path), head=head,
                                          num_labels=num_labels if head == "classification" else None)
    assert model.num_labels == num_labels
    batch = _padded_batch(kind, left_pad_rows=(2,) if kind == "roberta" else ())
    logits = np.asarray(model.apply(params, batch))
    with torch.no_grad():
        t_logits = tm(**_torch_inputs(batch)).logits.numpy()
    assert logits.shape == t_logits.shape == (5, num_labels)
    d = float(np.abs(logits - t_logits).max())
    print(f"\n{kind} {head} logits parity: max|d| {d:.3g} (|logits| up to {np.abs(t_logits).max():.3g})")
    assert d <= TOL
    assert np.abs(t_logits).max() > 0.1  # not a vacuous comparison of near-zeros
    if kind == "roberta":
        # The left-padded row only matches because positions skip the padding: transformers fed
        # plain sequential positions gives a clearly different answer for that row.
        naive = torch.arange(batch["input_ids"].shape[1]).expand(5, -1) + 2
        with torch.no_grad():
            t_naive = tm(**_torch_inputs(batch), position_ids=naive).logits.numpy()
        assert np.abs(t_naive[2] - logits[2]).max() > 100 * TOL


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_bare_encoder_all_positions_match_pytorch(kind, tmp_path):
    """Every position (padded ones too, whose RoBERTa position is the pad index) and the pooler."""
    tm = _tiny_torch(kind, bare=True)
    tm.save_pretrained(tmp_path, safe_serialization=True)
    model, params = hf_io.load_pretrained(str(tmp_path))
    batch = _padded_batch(kind)
    hidden, pooled, _ = _module_outputs(model, params, batch)
    with torch.no_grad():
        out = tm(**_torch_inputs(batch))
    d_h = float(np.abs(np.asarray(hidden) - out.last_hidden_state.numpy()).max())
    d_p = float(np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max())
    print(f"\n{kind} bare encoder parity: hidden max|d| {d_h:.3g}, pooler {d_p:.3g}")
    assert d_h <= TOL and d_p <= TOL


# --------------------------------------------------------------------------- bare checkpoint -> head


def test_bare_bert_checkpoint_into_classifier(tmp_path):
    """A BertModel checkpoint (no prefix, no head) loads under ``bert.``; the head is new."""
    tm = _tiny_torch("bert", bare=True)
    tm.save_pretrained(tmp_path, safe_serialization=True)
    tensors = hf_io.read_safetensors(str(tmp_path))
    assert not any(k.startswith("bert.") for k in tensors)
    model = build_model(hf_io.read_config(str(tmp_path)), head="classification", num_labels=3)
    assert model.head_prefixes == ("classifier",) and model.backbone_prefix == "bert"
    params, fresh = hf_io.params_from_tensors(model, tensors, rng=jax.random.PRNGKey(3))
    assert sorted(fresh) == ["classifier.bias", "classifier.kernel"]
    flat = hf_io.flatten(params)
    # Every backbone tensor, the pooler included (BERT's classifier reads it), under "bert.".
    backbone = {k for k in flat if not k.startswith("classifier.")}
    assert backbone and all(k.startswith("bert.") for k in backbone)
    assert len(backbone) == len([k for k in tensors if not k.endswith("position_ids")])
    np.testing.assert_array_equal(np.asarray(flat["bert.pooler.dense.kernel"]),
                                  tm.pooler.dense.weight.detach().numpy().T)
    kernel = np.asarray(flat["classifier.kernel"])
    assert kernel.shape == (32, 3) and 0 < kernel.std() < 0.1  # N(0, initializer_range), not zeros
    np.testing.assert_array_equal(np.asarray(flat["classifier.bias"]), np.zeros(3))
    # The loaded backbone is where transformers puts it: give torch our fresh head and compare.
    tc = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3).eval()
    with torch.no_grad():
        tc.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
        tc.classifier.bias.zero_()
        batch = _padded_batch("bert")
        t_logits = tc(**_torch_inputs(batch)).logits.numpy()
    assert np.abs(np.asarray(model.apply(params, batch)) - t_logits).max() <= TOL


def test_bare_roberta_checkpoint_into_classifier(tmp_path):
    tm = _tiny_torch("roberta", bare=True)
    tm.save_pretrained(tmp_path, safe_serialization=True)
    model = build_model(hf_io.read_config(str(tmp_path)), head="classification", num_labels=4)
    tensors = hf_io.read_safetensors(str(tmp_path))
    assert "pooler.dense.weight" in tensors  # RobertaModel keeps a pooler the classifier lacks
    params, fresh = hf_io.params_from_tensors(model, tensors)
    assert sorted(fresh) == ["classifier.dense.bias", "classifier.dense.kernel",
                             "classifier.out_proj.bias", "classifier.out_proj.kernel"]
    flat = hf_io.flatten(params)
    np.testing.assert_array_equal(np.asarray(flat["roberta.embeddings.word_embeddings.embedding"]),
                                  tm.embeddings.word_embeddings.weight.detach().numpy())
    assert not any("pooler" in k for k in flat)


# --------------------------------------------------------------------------- hook points


def test_sites_of_tiny_bert():
    from configs import models

    model = build_model(models.get("tiny-bert").hf_config, head="classification", num_labels=3)
    sites = Sites.discover(model)
    layers = model.config.num_hidden_layers
    for i in range(layers):
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"):
            assert f"bert.encoder.layer.{i}.{name}" in sites.linear
    q = sites.linear["bert.encoder.layer.0.attention.self.query"]
    assert q == dict(in_features=32, out_features=32, has_bias=True)
    assert sites.linear["bert.encoder.layer.0.intermediate.dense"]["out_features"] == 64
    assert set(sites.linear) - {s for s in sites.linear if ".encoder.layer." in s} == {
        "bert.pooler.dense", "classifier"}
    assert len(sites.linear) == 6 * layers + 2
    assert sites.backbone_linear.keys() == sites.linear.keys() - {"classifier"}
    # One attention_kv site per layer, one adapter point per attention / FFN block.
    assert set(sites.attention) == {f"bert.encoder.layer.{i}.attention.self" for i in range(layers)}
    assert sites.attention["bert.encoder.layer.1.attention.self"] == dict(kv_heads=4, head_dim=8)
    assert sites.blocks == {
        **{f"bert.encoder.layer.{i}.attention.output": dict(kind="attention", hidden=32)
           for i in range(layers)},
        **{f"bert.encoder.layer.{i}.output": dict(kind="ffn", hidden=32) for i in range(layers)},
    }
    assert sites.embeddings == {"bert.embeddings": dict(hidden=32)}
    # Every linear site is a module holding a kernel in the param tree (methods key params by it).
    paths = set(hf_io.flatten(model.abstract_params()))
    assert all(f"{s}.kernel" in paths for s in sites.linear)

"""Hugging Face checkpoint I/O: round trips, interop with transformers, and clear refusals.

Why bit-exact round trips: a fine-tuned model saved by peftjax must be the model that was
evaluated, to the last bit, and it must load in transformers unchanged (the point of the HF
layout). Why the error tests check message content: a checkpoint that does not fit is the most
common first failure of a user, and the message is the whole user interface.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from configs import models
from peftjax.models import build_model, hf_io
from peftjax.models.hf_io import CheckpointError

TOL = 1e-4


# --------------------------------------------------------------------------- fixtures
# (minilm_folder and minilm come from tests/models/conftest.py)


@pytest.fixture(scope="module")
def text_batch(minilm_folder) -> dict[str, np.ndarray]:
    tok = hf_io.load_tokenizer(minilm_folder)
    enc = tok(["Flight delayed again, thanks @united", "what a game!",
               "Self-driving cars are coming to Amsterdam next year, says the Dutch government"],
              padding=True, return_tensors="np")
    return {k: np.asarray(v, np.int32) for k, v in enc.items()}


def _tiny_bert_config(**kw) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=40, **kw)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny bare BertModel checkpoint written by transformers."""
    folder = str(tmp_path_factory.mktemp("tiny_bert"))
    torch.manual_seed(0)
    transformers.BertModel(_tiny_bert_config()).save_pretrained(folder, safe_serialization=True)
    return folder


def _copy_config(src: str, dst) -> None:
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def _assert_trees_equal(a: dict, b: dict) -> None:
    fa, fb = hf_io.flatten(a), hf_io.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and np.array_equal(x, y), k


def _perturbed(params: dict, scale: float = 1e-3) -> dict:
    """Params as after fine-tuning: every leaf moved, so a save that copied the source is caught.

    Small, as fine-tuning deltas are: at 1e-2 on every weight (LayerNorms included) one padded
    position of MiniLM becomes ill-conditioned in fp32 and both fp32 implementations drift
    ~1e-4 from a float64 reference there.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


# --------------------------------------------------------------------------- round trips


def test_minilm_round_trip_is_bit_exact(minilm, tmp_path):
    model, params = minilm
    hf_io.save_pretrained(model, params, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    model2, params2 = hf_io.load_pretrained(str(tmp_path))
    assert model2.config == model.config
    _assert_trees_equal(params, params2)


def test_sharded_save_round_trip(minilm, tmp_path):
    model, params = minilm
    hf_io.save_pretrained(model, params, str(tmp_path), max_shard_bytes=20_000_000)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len(shards) >= 4 and not any(f.endswith(".tmp") for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    tensors = hf_io.tensors_from_params(params)
    assert index["weight_map"].keys() == tensors.keys()
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for shard in shards:  # within the limit, unless one tensor alone exceeds it (as in HF)
        names = [k for k, v in index["weight_map"].items() if v == shard]
        assert sum(tensors[k].nbytes for k in names) <= 20_000_000 or len(names) == 1, shard
    _, params2 = hf_io.load_pretrained(str(tmp_path))
    _assert_trees_equal(params, params2)
    # transformers follows the same index.
    tm = transformers.BertModel.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(tm.encoder.layer[5].output.dense.weight.detach().numpy(),
                                  np.asarray(params["encoder"]["layer"]["5"]["output"]["dense"]["kernel"]).T)


def test_saved_checkpoint_loads_in_pytorch(minilm, minilm_folder, text_batch, tmp_path):
    model, params = minilm
    tuned = _perturbed(params)
    hf_io.save_pretrained(model, tuned, str(tmp_path))
    tm = transformers.BertModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        out = tm(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in text_batch.items()})
    hidden = np.asarray(jax.jit(model.apply)(tuned, text_batch))
    d = float(np.abs(hidden - out.last_hidden_state.numpy()).max())
    print(f"\nsaved (perturbed) MiniLM in PyTorch vs flax: max|d| {d:.3g}")
    assert d <= TOL
    # And the saved weights are the tuned ones, not the source checkpoint's.
    orig = hf_io.read_safetensors(minilm_folder)["encoder.layer.0.attention.self.query.weight"]
    assert not np.allclose(tm.encoder.layer[0].attention.self.query.weight.detach().numpy(), orig)


def test_resave_replaces_previous_weights(minilm, tmp_path):
    """Saving into a folder that holds an earlier save never leaves the old weights to be loaded.

    Bug this caught: an unsharded save over a sharded one left the old index behind, and
    loading (ours, which prefers the index) silently returned the old weights; the reverse left
    a stale model.safetensors that transformers prefers over the index.
    """
    model, params = minilm
    tuned = _perturbed(params)
    folder = str(tmp_path)
    hf_io.save_pretrained(model, params, folder, max_shard_bytes=20_000_000)
    hf_io.save_pretrained(model, tuned, folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    _assert_trees_equal(tuned, hf_io.load_pretrained(folder)[1])
    hf_io.save_pretrained(model, params, folder, max_shard_bytes=20_000_000)
    assert "model.safetensors" not in os.listdir(folder)
    _assert_trees_equal(params, hf_io.load_pretrained(folder)[1])


def test_bf16_params_round_trip(tmp_path):
    model = build_model(models.get("tiny-bert").hf_config)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.init(jax.random.PRNGKey(0)))
    hf_io.save_pretrained(model, params, str(tmp_path))
    _, params2 = hf_io.load_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    _assert_trees_equal(params, params2)


@pytest.mark.parametrize("head,num_labels", [("classification", 3), ("regression", 1)])
def test_saved_head_size_survives(head, num_labels, tmp_path):
    """A head built with num_labels != the config's default is saved as such.

    Bug this caught: config.json kept the source config's label count (2), so the checkpoint
    did not load back (mis-shaped classifier) nor into transformers.
    """
    model = build_model(models.get("tiny-bert").hf_config, head=head, num_labels=num_labels)
    assert model.hf_config.num_labels == 2  # the named config's default
    params = model.init(jax.random.PRNGKey(0))
    hf_io.save_pretrained(model, params, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["id2label"].keys() == \
        {str(i) for i in range(num_labels)}
    model2, params2 = hf_io.load_pretrained(str(tmp_path), head=head)
    assert model2.num_labels == num_labels
    _assert_trees_equal(params, params2)
    tm = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    batch = model.dummy_batch(2, 6)
    with torch.no_grad():
        t_logits = tm(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}).logits
    assert np.abs(np.asarray(model.apply(params, batch)) - t_logits.numpy()).max() <= TOL


def test_headed_checkpoint_into_bare_model(tmp_path):
    """bert-base-uncased's layout (``bert.`` prefix, legacy gamma/beta, pre-training heads)
    loads into the bare encoder and into a classifier, as transformers' base_model_prefix does.

    Bug this caught: a bare model only looked for un-prefixed names, so every real BERT/RoBERTa
    checkpoint saved with a head (and a causal LM's ``model.*``) failed with missing tensors.
    """
    torch.manual_seed(0)
    tm = transformers.BertForPreTraining(_tiny_bert_config()).eval()
    tensors = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    legacy = {}
    for k, v in tensors.items():
        if ".LayerNorm." in k and k.startswith("bert."):
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[k] = v
    assert any(k.startswith("cls.") for k in legacy) and any(k.endswith(".gamma") for k in legacy)
    os.makedirs(tmp_path / "ckpt")
    save_file(legacy, str(tmp_path / "ckpt" / "model.safetensors"))
    (tmp_path / "ckpt" / "config.json").write_text(tm.config.to_json_string())

    bare, params = hf_io.load_pretrained(str(tmp_path / "ckpt"))
    flat = hf_io.flatten(params)
    np.testing.assert_array_equal(np.asarray(flat["embeddings.LayerNorm.scale"]),
                                  tensors["bert.embeddings.LayerNorm.weight"])
    np.testing.assert_array_equal(np.asarray(flat["pooler.dense.kernel"]),
                                  tensors["bert.pooler.dense.weight"].T)
    clf, cparams = hf_io.load_pretrained(str(tmp_path / "ckpt"), head="classification", num_labels=2)
    cflat = hf_io.flatten(cparams)
    for k, v in flat.items():
        np.testing.assert_array_equal(np.asarray(cflat[f"bert.{k}"]), np.asarray(v))
    # The bare model computes what transformers' BertModel computes from this checkpoint.
    batch = bare.dummy_batch(2, 6)
    with torch.no_grad():
        ref = tm.bert(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()})
    assert np.abs(np.asarray(bare.apply(params, batch)) - ref.last_hidden_state.numpy()).max() <= TOL


# --------------------------------------------------------------------------- refusals


def _write_tensors(folder, tensors: dict) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))


def test_missing_tensor_is_named(tiny_folder, tmp_path):
    tensors = hf_io.read_safetensors(tiny_folder)
    del tensors["encoder.layer.1.attention.self.key.weight"]
    _copy_config(tiny_folder, tmp_path)
    _write_tensors(tmp_path, tensors)
    with pytest.raises(CheckpointError) as e:
        hf_io.load_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "missing tensors (1)" in msg and "encoder.layer.1.attention.self.key.weight" in msg
    assert str(tmp_path) in msg
    # In a model with a head, the backbone tensor is still required (only the head may be new).
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\).*attention\.self\.key\.weight"):
        hf_io.load_pretrained(str(tmp_path), head="classification", num_labels=2)


def test_misshaped_tensor_is_named_with_both_shapes(tiny_folder, tmp_path):
    tensors = hf_io.read_safetensors(tiny_folder)
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((48, 32), np.float32)
    _copy_config(tiny_folder, tmp_path)
    _write_tensors(tmp_path, tensors)
    with pytest.raises(CheckpointError) as e:
        hf_io.load_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "mis-shaped tensors (1)" in msg
    assert "encoder.layer.0.intermediate.dense.weight: checkpoint (48, 32), model expects (64, 32)" in msg


@pytest.mark.parametrize("model_type", ["gpt_neox", "falcon"])
def test_unsupported_architecture(tiny_folder, tmp_path, model_type):
    shutil.copy(os.path.join(tiny_folder, "model.safetensors"), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 32}))
    with pytest.raises(ValueError) as e:
        hf_io.load_pretrained(str(tmp_path))
    msg = str(e.value)
    assert f"model_type={model_type!r}" in msg and "supported model types" in msg
    for supported in ("bert", "roberta"):
        assert supported in msg


_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


def test_pickled_weights_are_refused_unopened(tiny_folder, tmp_path, monkeypatch):
    global _OPENED
    _copy_config(tiny_folder, tmp_path)
    # Garbage: were it ever unpickled (torch.load / pickle), the error would be an unpickling one.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x05garbage, not a pickle" * 10)
    sys.addaudithook(_audit)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    _OPENED = []
    try:
        with pytest.raises(CheckpointError) as e:
            hf_io.load_pretrained(str(tmp_path))
        opened = list(_OPENED)
    finally:
        _OPENED = None
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "never unpickles" in msg
    assert "Convert the checkpoint to safetensors" in msg
    assert not any(p.endswith("pytorch_model.bin") for p in opened), opened
    assert any(p.endswith("config.json") for p in opened)  # the hook did see the other opens


def test_missing_config_json(tiny_folder, tmp_path):
    shutil.copy(os.path.join(tiny_folder, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no config.json"):
        hf_io.load_pretrained(str(tmp_path))


def test_other_folder_errors(tiny_folder, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf_io.load_pretrained(str(tmp_path / "nope"))
    _copy_config(tiny_folder, tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"has no \*\.safetensors weights"):
        hf_io.load_pretrained(str(tmp_path / "empty"))
    _copy_config(tiny_folder, tmp_path / "sharded")
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        hf_io.load_pretrained(str(tmp_path / "sharded"))
    with pytest.raises(CheckpointError, match="not installed"):
        hf_io.resolve_checkpoint("package:no_such_peftjax_package/model")


def test_head_the_family_lacks(minilm_folder):
    with pytest.raises(ValueError) as e:
        hf_io.load_pretrained(minilm_folder, head="causal_lm")
    msg = str(e.value)
    assert "task/model mismatch" in msg and "'causal_lm'" in msg
    assert "none, classification, regression" in msg


def test_load_from_named_config(minilm):
    named = models.get("all-MiniLM-L6-v2")
    assert named.pooling == "mean"   # the model's default head reads the mean of the tokens
    named.pooling = "cls"            # the fixture loads transformers' pooler head
    model, params, tok = hf_io.load_from_config(named)
    assert model.config == minilm[0].config and tok is not None
    _assert_trees_equal(params, minilm[1])
    with pytest.raises(ValueError) as e:
        models.get("bert-base-cased-typo")
    msg = str(e.value)
    assert "unknown model 'bert-base-cased-typo'" in msg
    for name in ("all-MiniLM-L6-v2", "bert-base-uncased", "roberta-base", "tiny-bert"):
        assert name in msg

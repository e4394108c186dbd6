"""HF PEFT interop for LoRA and DoRA on Qwen2, Qwen3 and Mistral, both directions.

The tiny checkpoints are those of tests/models/test_qwen_mistral.py (Qwen2's q/k/v biases and
tied embeddings, Qwen3's q/k norms, sliding windows shorter than the batch). PEFT builds the
adapter on transformers' model with non-zero B (``init_lora_weights=False``) and perturbed DoRA
magnitudes and saves it; ``import_adapter`` reads it into peftjax (PEFT → peftjax) and ``export_adapter`` of that
import writes what PEFT itself wrote (same tensors, same config fields); then every added tensor
is moved to values of our own, exported and loaded into PEFT (peftjax → PEFT). Logits agree to
1e-4 at real tokens of a right-padded batch.
"""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file

from peftjax.interop import export_adapter, import_adapter, peft_params
from peftjax.models import hf_io
from tests.models.test_decoder_families import FAMILIES, hf_model

TOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    name = request.param
    torch_model = hf_model(name)
    return (name, torch_model) + load_with_batch(torch_model, str(tmp_path_factory.mktemp(f"{name}_peft_ckpt")))


def load_with_batch(torch_model, folder: str) -> tuple:
    """(our model, flat params, a right-padded batch) of ``torch_model`` saved into ``folder``."""
    torch_model.save_pretrained(folder, safe_serialization=True)
    model, params = hf_io.load_pretrained(folder, head="causal_lm")
    rs = np.random.RandomState(1)
    ids = rs.randint(3, 128, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding: positions agree with transformers' defaults
    return model, hf_io.flatten(params), {"input_ids": ids, "attention_mask": mask}


def saved_peft_model(torch_model, config, folder: str):
    """PEFT's adapter on a copy of ``torch_model`` (random factors: ``init_lora_weights=False``;
    DoRA magnitudes moved off ||W0||), saved into ``folder``; returns the PEFT model."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(torch_model), config).eval()
    with torch.no_grad():
        for k, v in pm.named_parameters():
            if "lora_magnitude" in k:
                v.add_(0.05 * torch.randn_like(v))
    pm.save_pretrained(folder)
    return pm


def logits_delta(ours: np.ndarray, peft_model, batch) -> float:
    with torch.no_grad():
        theirs = peft_model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}).logits
    return float(np.abs(ours - theirs.numpy())[batch["attention_mask"].astype(bool)].max())


def _cells():
    """LoRA on every family in make test; DoRA (the same export path plus magnitudes) on Gemma 3
    there and on the others under -m slow (time budget)."""
    for f in FAMILIES:
        yield f, "lora"
        yield (f, "dora") if f == "gemma3" else pytest.param(f, "dora", marks=pytest.mark.slow)


@pytest.mark.parametrize("family,method_name", list(_cells()), indirect=["family"])
def test_lora_dora_both_ways(family, method_name, tmp_path):
    name, torch_model, model, params, batch = family
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS,
                             init_lora_weights=False, use_dora=method_name == "dora")
    pm = saved_peft_model(torch_model, config, str(tmp_path / "peft"))

    method, trainable = import_adapter(str(tmp_path / "peft"), model)
    assert method.name == method_name
    assert len(method.targets) == 2 * len(TARGETS)
    p = peft_params(method, trainable, params)
    apply = jax.jit(lambda t, f, s, b: method.apply(t, f, s, b))
    ours = np.asarray(apply(p.trainable, p.frozen, p.state, batch))
    delta = logits_delta(ours, pm, batch)
    print(f"\n{name} {method_name} PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL
    with pm.disable_adapter():  # not vacuous: the adapter changes the logits
        assert logits_delta(ours, pm, batch) > 1e-2

    export_adapter(method, trainable, str(tmp_path / "ours"))
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ca = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    cb = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    for field in ("peft_type", "task_type", "r", "lora_alpha", "use_dora", "use_rslora"):
        assert ca[field] == cb[field], field

    # peftjax → PEFT with values of our own: every added tensor moved off PEFT's, exported, loaded.
    rs = np.random.RandomState(7)
    added = {k: np.asarray(v) + rs.normal(0, 0.05, np.shape(v)).astype(np.float32)
             for k, v in trainable["added"].items()}
    mine = {**trainable, "added": added}
    p = peft_params(method, mine, params)
    ours = np.asarray(apply(p.trainable, p.frozen, p.state, batch))
    export_adapter(method, mine, str(tmp_path / "mine"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "mine")).eval()
    delta = logits_delta(ours, loaded, batch)
    print(f"{name} {method_name} peftjax→PEFT: max|Δ| {delta:.2e}")
    assert delta <= TOL
    assert logits_delta(ours, pm, batch) > 1e-3   # not PEFT's own adapter any more

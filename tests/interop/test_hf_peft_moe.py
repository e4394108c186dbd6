"""HF PEFT interop on Qwen3-MoE, both directions: LoRA and DoRA on modules, and LoRA on the
stacked expert params and the router (PEFT's ``target_parameters``, ``lora.ParamWrapper``).

PEFT builds each adapter on transformers' model with random (non-zero) factors and saves it;
``import_adapter`` reads it (PEFT → peftjax); then every added tensor is moved to values of our
own, exported with ``export_adapter`` and loaded by ``PeftModel.from_pretrained`` (peftjax →
PEFT). Logits agree to 1e-4 at the real tokens of a right-padded batch. The tiny checkpoint is
tests/models/test_qwen3_moe.py's (6 experts, top-2, a dense middle layer).
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
from tests.interop.test_hf_peft_decoders import load_with_batch, logits_delta, saved_peft_model
from tests.models.test_qwen3_moe import hf_model

TOL = 1e-4
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    torch_model = hf_model()
    return (torch_model,) + load_with_batch(torch_model, str(tmp_path_factory.mktemp("qwen3_moe_peft_ckpt")))


def _round_trip(torch_model, model, params, batch, config, tmp_path, expected_name):
    pm = saved_peft_model(torch_model, config, str(tmp_path / "peft"))
    theirs_config = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    theirs_tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))

    method, trainable = import_adapter(str(tmp_path / "peft"), model)
    assert method.name == expected_name
    p = peft_params(method, trainable, params)
    apply = jax.jit(lambda t, f, s, b: method.apply(t, f, s, b))
    delta = logits_delta(np.asarray(apply(p.trainable, p.frozen, p.state, batch)), pm, batch)
    print(f"\nqwen3_moe {expected_name} {theirs_config.get('target_parameters')} PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL

    # What we write for the imported adapter is what PEFT wrote: same keys, shapes, values.
    export_adapter(method, p.trainable, str(tmp_path / "again"), state=p.state)
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(again) == set(theirs_tensors)
    for k, v in theirs_tensors.items():
        np.testing.assert_allclose(again[k], v, rtol=0, atol=1e-7, err_msg=k)
    mine = json.load(open(tmp_path / "again" / "adapter_config.json"))
    theirs_tp, mine_tp = theirs_config.get("target_parameters") or [], mine.get("target_parameters") or []
    assert bool(mine_tp) == bool(theirs_tp)
    assert all(any(t == n or t.endswith("." + n) for n in theirs_tp) for t in mine_tp)

    # peftjax → PEFT with values of our own.
    rs = np.random.RandomState(7)
    moved = {k: v + 0.05 * rs.randn(*v.shape).astype(np.float32) for k, v in p.trainable["added"].items()}
    trained = dict(p.trainable, added=moved)
    export_adapter(method, trained, str(tmp_path / "ours"), state=p.state)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "ours")).eval()
    delta = logits_delta(np.asarray(apply(trained, p.frozen, p.state, batch)), loaded, batch)
    print(f"qwen3_moe {expected_name} peftjax→PEFT: max|Δ| {delta:.2e}")
    assert delta <= TOL
    return method, mine


@pytest.mark.parametrize("method_name", ["lora", pytest.param("dora", marks=pytest.mark.slow)])
def test_lora_dora_on_modules_both_ways(moe, method_name, tmp_path):
    torch_model, model, params, batch = moe
    # down_proj names the dense layer's Linear and the experts' stacked param; PEFT's ParamWrapper
    # refuses DoRA (and PEFT refuses up_proj alone: fused into gate_up_proj), so DoRA targets
    # the attention projections.
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["down_proj"] if method_name == "lora" else [])
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets,
                             init_lora_weights=False, use_dora=method_name == "dora")
    method, _ = _round_trip(torch_model, model, params, batch, config, tmp_path, method_name)
    # "down_proj" names the dense layer's Linear and the experts' stacked param. PEFT 0.21 moves
    # such a name to target_parameters (the experts only); 0.22 keeps it in target_modules too
    # (the dense Linear as well). The import follows the file, so both sides adapt the same
    # weights under either version: the targets are exactly the modules PEFT's file adapts.
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    adapted = sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                     for k in keys if k.endswith(".lora_A.weight"))
    stacked = [f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 2)] if method_name == "lora" else []
    assert sorted(method.targets) == [a for a in adapted if not a.endswith("mlp.experts")]
    assert len(method.targets) in ((3 * 4, 3 * 4 + 1) if method_name == "lora" else (3 * 4,))
    assert method.grouped_targets == stacked


def test_lora_on_experts_and_router_both_ways(moe, tmp_path):
    """Per-expert LoRA on both stacked expert params (nested ParamWrappers: gate_up_proj under
    ``experts.base_layer``), the router as ``mlp.gate.weight``, and q_proj as a module."""
    torch_model, model, params, batch = moe
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=6, target_modules=["q_proj"],
                             target_parameters=EXPERTS + ["mlp.gate.weight"], init_lora_weights=False)
    method, written = _round_trip(torch_model, model, params, batch, config, tmp_path, "lora")
    assert method.grouped_targets == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 2)
                                      for p in ("gate_up_proj", "down_proj")]
    assert "model.layers.0.mlp.gate" in method.targets
    assert written["target_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    shapes = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert shapes["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"] == (2 * 6, 64)
    assert shapes["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"] == (48, 2 * 6)
    assert shapes["base_model.model.model.layers.0.mlp.experts.lora_A.weight"] == (2 * 6, 24)
    assert shapes["base_model.model.model.layers.0.mlp.experts.lora_B.weight"] == (64, 2 * 6)


def test_lora_on_down_proj_experts_only_both_ways(moe, tmp_path):
    """One stacked param, no module targets (PEFT: target_modules=[]): no nesting."""
    torch_model, model, params, batch = moe
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=3, lora_alpha=3, target_modules=[],
                             target_parameters=["mlp.experts.down_proj"], init_lora_weights=False,
                             use_rslora=True)
    method, written = _round_trip(torch_model, model, params, batch, config, tmp_path, "lora")
    assert method.targets == [] and len(method.grouped_targets) == 2
    assert written["target_modules"] == [] and written["use_rslora"] is True


def test_counts_equal_peft(moe):
    """Trainable parameters of LoRA on experts equal PEFT's count for the same config."""
    from peftjax import methods

    torch_model, model, _, _ = moe
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             target_parameters=EXPERTS + ["mlp.gate.weight"])
    pm = peft.get_peft_model(copy.deepcopy(torch_model), config)
    theirs = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad)
    method = methods.create("lora", model, {"rank": 4, "alpha": 8.0,
                                            "target_parameters": tuple(EXPERTS + ["mlp.gate.weight"])})
    assert methods.count_params(method)["trainable_params"] == theirs


def test_target_parameters_refusals(moe):
    from peftjax import methods

    _, model, _, _ = moe
    with pytest.raises(ValueError, match="matches no param; available"):
        methods.create("lora", model, {"target_parameters": ("mlp.experts.up_proj",)})
    with pytest.raises(ValueError, match="plain LoRA's"):
        methods.create("dora", model, {"target_parameters": tuple(EXPERTS)})
    with pytest.raises(ValueError, match="dropout=0"):
        methods.create("lora", model, {"dropout": 0.1, "target_parameters": tuple(EXPERTS)})

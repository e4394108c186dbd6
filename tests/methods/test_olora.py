"""OLoRA specifics: the QR init and residual base as PEFT computes them, counts equal to PEFT's,
and PEFT's conventions for a base-rewriting init both ways (export: a rank-2r LoRA of the
original base; import of PEFT's ``init_lora_weights="olora"`` file: the residual rebuilt)."""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util

from peftjax import methods
from peftjax.interop import export_adapter, import_adapter, peft_params
from tests.helpers import learnable_batch, tiny_model
from tests.peft_peer import TOL, checkpoint, max_delta, ours, perturb, task_type, theirs

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
CONFIG = {"rank": 4, "alpha": 16.0}


def ours_config(family: str) -> dict:
    return {**CONFIG, "targets": r"\.(" + "|".join(TARGETS[family]) + ")$"}


def peft_olora(family: str, net):
    return peft.get_peft_model(net, peft.LoraConfig(
        task_type=task_type(family), r=CONFIG["rank"], lora_alpha=CONFIG["alpha"],
        target_modules=TARGETS[family], init_lora_weights="olora")).eval()


def test_qr_init_and_residual_as_written():
    """W = Kᵀ = Q R: A = R[:r]ᵀ, B = Q[:, :r]ᵀ (B's rows orthonormal), K_res + s·A B = K."""
    model, base = tiny_model("llama")
    m = methods.create("olora", model, CONFIG)
    p = m.setup(jax.random.PRNGKey(0), base)
    assert m.rewrites_base and m.targets
    for site in m.targets:
        k = np.asarray(base[site + ".kernel"])
        a = np.asarray(p.trainable["added"][site + ".lora_A"])
        b = np.asarray(p.trainable["added"][site + ".lora_B"])
        q, r = np.linalg.qr(k.T)
        np.testing.assert_allclose(np.abs(a), np.abs(r[:4].T), atol=1e-5)   # up to LAPACK's signs
        np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)
        np.testing.assert_allclose(np.asarray(p.frozen[site + ".kernel"]) + m.scaling * a @ b, k, atol=1e-5)
    batch = learnable_batch(model)
    plain = model.apply(traverse_util.unflatten_dict(base, sep="."), batch)
    np.testing.assert_allclose(np.asarray(m.apply(p.trainable, p.frozen, p.state, batch)),
                               np.asarray(plain), atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_init_residual_and_count_equal_peft(family):
    net, model, params, _ = checkpoint(family)
    m = methods.create("olora", model, ours_config(family))
    p = m.setup(jax.random.PRNGKey(0), params)
    pm = peft_olora(family, net)
    modules = dict(pm.base_model.model.named_modules())
    for site in m.targets:
        layer = modules[site]
        np.testing.assert_allclose(np.asarray(p.trainable["added"][site + ".lora_A"]).T,
                                   layer.lora_A["default"].weight.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(p.trainable["added"][site + ".lora_B"]).T,
                                   layer.lora_B["default"].weight.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(p.frozen[site + ".kernel"]).T,
                                   layer.base_layer.weight.detach().numpy(), atol=1e-5)
    counts = methods.count_params(m)
    assert counts["trainable_params"] + counts["head_params"] == pm.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_export_is_a_lora_of_the_unmodified_base(family, tmp_path):
    net, model, params, batch = checkpoint(family)
    m = methods.create("olora", model, ours_config(family))
    p = m.setup(jax.random.PRNGKey(0), params)
    initial = p.trainable["added"]
    trained = {"base": {}, "added": perturb(initial, 3, 0.05), "head": perturb(p.trainable["head"], 2)}
    p = p._replace(trainable=trained)
    config = export_adapter(m, trained, str(tmp_path), initial_added=initial)
    assert config["r"] == 8 and config["lora_alpha"] == 32.0 and config["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(net, str(tmp_path)).eval()   # the pretrained weights
    delta = max_delta(ours(m, p, batch), theirs(loaded, batch), batch)
    print(f"\n{family} olora peftjax→PEFT (converted): max|Δ| {delta:.2e}")
    assert delta <= TOL


def test_peft_olora_file_imports_with_the_residual_rebuilt(tmp_path):
    net, model, params, batch = checkpoint("llama")
    pm = peft_olora("llama", net)
    torch.manual_seed(3)
    with torch.no_grad():
        for k, v in pm.named_parameters():
            if v.requires_grad:
                v.add_(0.05 * torch.randn_like(v))
    pm.save_pretrained(str(tmp_path))       # PEFT's plain save: init_lora_weights="olora"
    method, trainable = import_adapter(str(tmp_path), model)
    assert method.name == "olora" and method.config.rank == 4 and method.rewrites_base
    delta = max_delta(ours(method, peft_params(method, trainable, params), batch), theirs(pm, batch), batch)
    print(f"\nllama olora PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL
    # PEFT itself re-runs the init on load: its reloaded model is the same one
    reloaded = peft.PeftModel.from_pretrained(checkpoint("llama")[0], str(tmp_path)).eval()
    assert max_delta(theirs(reloaded, batch), theirs(pm, batch), batch) <= TOL

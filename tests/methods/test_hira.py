"""HiRA specifics: ΔW = W0 ⊙ (A B) without scaling, PEFT's init, counts equal to PEFT's, and
PEFT HIRA files both ways."""

from __future__ import annotations

import math

import jax
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.interop import export_adapter, import_adapter, peft_params
from peftjax.models import build_model
from tests.helpers import learnable_batch, tiny_model
from tests.peft_peer import TOL, checkpoint, max_delta, ours, perturb, task_type, theirs

TARGETS = {"bert": ["query", "value", "output.dense"], "llama": ["q_proj", "k_proj", "down_proj"]}


def ours_config(family: str, rank: int = 4) -> dict:
    return {"rank": rank, "targets": r"\.(" + "|".join(t.replace(".", r"\.") for t in TARGETS[family]) + ")$"}


def test_update_is_w0_hadamard_ab_in_both_forward_paths():
    """Written in torch layout: W' = W + W ⊙ (B A); the one-GEMM path and the two-term path
    (taken with dropout or outside float32) agree with it."""
    model, base = tiny_model("llama")
    m = methods.create("hira", model, {"rank": 4})
    p = m.setup(jax.random.PRNGKey(0), base)
    rng = np.random.default_rng(0)
    added = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.trainable["added"].items()}
    manual = dict(base)
    for s in m.targets:
        w = np.asarray(base[s + ".kernel"]).T                         # (out, in)
        a, b = added[s + ".lora_A"].T, added[s + ".lora_B"].T        # PEFT's (r, in), (out, r)
        manual[s + ".kernel"] = (w + w * (b @ a)).T
    batch = learnable_batch(model)
    plain = np.asarray(model.apply(traverse_util.unflatten_dict(manual, sep="."), batch))
    trainable = {**p.trainable, "added": added}
    np.testing.assert_allclose(np.asarray(m.apply(trainable, p.frozen, p.state, batch)), plain, atol=1e-4)
    m.merged_forward = lambda *args: False
    np.testing.assert_allclose(np.asarray(m.apply(trainable, p.frozen, p.state, batch)), plain, atol=1e-4)
    assert m.low_rank_factors(added, p.state) is None       # not a low-rank term: no AdapterSet


def test_init_as_peft_and_starts_equal_to_base():
    model, base = tiny_model("bert")
    m = methods.create("hira", model, {"rank": 8})
    p = m.setup(jax.random.PRNGKey(0), base)
    for s in m.targets:
        a = np.asarray(p.trainable["added"][s + ".lora_A"])
        bound = 1 / math.sqrt(a.shape[0])                         # kaiming_uniform(a=√5)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
        assert not np.asarray(p.trainable["added"][s + ".lora_B"]).any()
    batch = learnable_batch(model)
    plain = model.apply(traverse_util.unflatten_dict(base, sep="."), batch)
    np.testing.assert_allclose(np.asarray(m.apply(p.trainable, p.frozen, p.state, batch)),
                               np.asarray(plain), atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_counts_and_adapter_files_both_ways_with_peft(family, tmp_path):
    net, model, params, batch = checkpoint(family)
    method = methods.create("hira", model, ours_config(family))
    pm = peft.get_peft_model(net, peft.HiraConfig(task_type=task_type(family), r=4,
                                                  target_modules=TARGETS[family])).eval()
    counts = methods.count_params(method)
    assert counts["trainable_params"] + counts["head_params"] == pm.get_nb_trainable_parameters()[0]

    p = method.setup(jax.random.PRNGKey(0), params)
    trained = {"base": {}, "added": perturb(p.trainable["added"], 4, 0.3),
               "head": perturb(p.trainable["head"], 2)}
    p = p._replace(trainable=trained)
    config = export_adapter(method, trained, str(tmp_path / "ours"))
    assert config["peft_type"] == "HIRA" and config["r"] == 4
    loaded = peft.PeftModel.from_pretrained(checkpoint(family)[0], str(tmp_path / "ours")).eval()
    delta = max_delta(ours(method, p, batch), theirs(loaded, batch), batch)
    print(f"\n{family} hira peftjax→PEFT: max|Δ| {delta:.2e}")
    assert delta <= TOL

    torch.manual_seed(3)
    with torch.no_grad():
        for k, v in pm.named_parameters():
            if v.requires_grad:
                v.add_(0.3 * torch.randn_like(v))
    pm.save_pretrained(str(tmp_path / "peft"))
    method2, trainable = import_adapter(str(tmp_path / "peft"), model)
    assert method2.name == "hira" and sorted(method2.targets) == sorted(method.targets)
    delta = max_delta(ours(method2, peft_params(method2, trainable, params), batch), theirs(pm, batch), batch)
    print(f"\n{family} hira PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL


def test_counts_on_roberta_base():
    model = build_model(model_configs.get("roberta-base").hf_config, head="classification", num_labels=2)
    counts = methods.count_params(methods.create("hira", model, {"rank": 8, "targets": r"\.(query|value)$"}))
    assert counts["trainable_params"] == 12 * 2 * 8 * (768 + 768) == 294_912

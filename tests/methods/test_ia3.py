"""(IA)³ specifics: PEFT's default targets and feedforward modules, output vs input scaling,
counts equal to PEFT's, adapter files both ways against PEFT."""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
from flax import traverse_util

from configs import models as model_configs
from peftjax import methods
from peftjax.interop import export_adapter, import_adapter, peft_params
from peftjax.models import build_model
from tests.helpers import learnable_batch, tiny_model
from tests.peft_peer import (TOL, checkpoint, max_delta, ours, perturb, task_type, theirs,
                             trainable_count)


def peft_layers(pm) -> dict[str, bool]:
    """{module path: is_feedforward} of the (IA)³ layers PEFT created."""
    return {k.removeprefix("base_model.model."): m.is_feedforward for k, m in pm.named_modules()
            if hasattr(m, "ia3_l") and "default" in m.ia3_l}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_defaults_and_counts_equal_peft(family):
    net, model, _, _ = checkpoint(family)
    method = methods.create("ia3", model, {})
    pm = peft.get_peft_model(net, peft.IA3Config(task_type=task_type(family)))
    layers = peft_layers(pm)
    assert sorted(method.targets) == sorted(layers)
    assert method.feedforward == {s for s, ff in layers.items() if ff}
    if family == "bert":  # PEFT's suffix rule: the attention output projection is feedforward too
        assert "bert.encoder.layer.0.attention.output.dense" in method.feedforward
    counts = methods.count_params(method)
    theirs_count = pm.get_nb_trainable_parameters()[0]
    assert counts["trainable_params"] + counts["head_params"] == theirs_count
    # a non-default setting too: no feedforward modules, every vector on the outputs
    method = methods.create("ia3", model, {"feedforward": []})
    counts = methods.count_params(method)
    config = peft.IA3Config(task_type=task_type(family), feedforward_modules=[])
    assert counts["trainable_params"] + counts["head_params"] == trainable_count(family, config)


def test_scales_outputs_and_feedforward_inputs():
    """y = (x W0 + b) ⊙ l at keys/values, (x ⊙ l) W0 + b at feedforward targets, written on the
    torch-layout weight (out, in): diag(l) W, b ⊙ l and W diag(l)."""
    model, base = tiny_model("bert")
    m = methods.create("ia3", model, {})
    peft_ = m.setup(jax.random.PRNGKey(0), base)
    assert all(np.all(np.asarray(v) == 1.0) for v in peft_.trainable["added"].values())
    rng = np.random.default_rng(0)
    added = {k: 1 + 0.5 * rng.standard_normal(v.shape).astype(np.float32)
             for k, v in peft_.trainable["added"].items()}
    manual = dict(base)
    for s in m.targets:
        w = np.asarray(base[s + ".kernel"]).T            # torch (out, in)
        lv = added[s + ".ia3_l"]
        if s in m.feedforward:
            manual[s + ".kernel"] = (w * lv[None, :]).T
        else:
            manual[s + ".kernel"] = (lv[:, None] * w).T
            manual[s + ".bias"] = np.asarray(base[s + ".bias"]) * lv
    batch = learnable_batch(model)
    plain = model.apply(traverse_util.unflatten_dict(manual, sep="."), batch)
    out = m.apply({**peft_.trainable, "added": added}, peft_.frozen, peft_.state, batch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-5)


def test_feedforward_must_be_among_the_targets():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="feedforward pattern .* matches no module"):
        methods.create("ia3", model, {"targets": r"\.(k_proj|v_proj)$", "feedforward": "down_proj"})


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_adapter_files_both_ways_with_peft(family, tmp_path):
    net, model, params, batch = checkpoint(family)
    method = methods.create("ia3", model, {})
    p = method.setup(jax.random.PRNGKey(0), params)
    trained = {"base": {}, "added": perturb(p.trainable["added"], 4, 0.3),
               "head": perturb(p.trainable["head"], 2)}
    p = p._replace(trainable=trained)
    config = export_adapter(method, trained, str(tmp_path / "ours"))
    assert config["peft_type"] == "IA3"
    loaded = peft.PeftModel.from_pretrained(checkpoint(family)[0], str(tmp_path / "ours")).eval()
    assert peft_layers(loaded) == {s: s in method.feedforward for s in method.targets}
    delta = max_delta(ours(method, p, batch), theirs(loaded, batch), batch)
    print(f"\n{family} ia3 peftjax→PEFT: max|Δ| {delta:.2e}")
    assert delta <= TOL

    import torch

    pm = peft.get_peft_model(net, peft.IA3Config(task_type=task_type(family))).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for k, v in pm.named_parameters():
            if v.requires_grad:
                v.add_(0.3 * torch.randn_like(v))
    pm.save_pretrained(str(tmp_path / "peft"))
    method2, trainable = import_adapter(str(tmp_path / "peft"), model)
    assert method2.name == "ia3" and sorted(method2.targets) == sorted(method.targets)
    assert method2.feedforward == method.feedforward
    delta = max_delta(ours(method2, peft_params(method2, trainable, params), batch), theirs(pm, batch), batch)
    print(f"\n{family} ia3 PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL


def test_counts_on_roberta_base():
    """PEFT's defaults on roberta-base: key, value (out 768), attention.output.dense (in 768)
    and output.dense (in 3072) in each of 12 layers."""
    model = build_model(model_configs.get("roberta-base").hf_config, head="classification", num_labels=2)
    counts = methods.count_params(methods.create("ia3", model, {}))
    assert counts["trainable_params"] == 12 * (768 + 768 + 768 + 3072) == 64_512
    assert counts["head_params"] == 768 * 768 + 768 + 768 * 2 + 2   # PEFT's modules_to_save

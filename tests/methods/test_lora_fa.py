"""LoRA-FA specifics: A is frozen method state drawn with LoRA's init and only B trains; the
update and B's gradient are those of h = x W0 + s·x A B written out; the optional projection is
PEFT's LoraFAOptimizer step for step; counts equal PEFT's (B and the head); the PEFT file is a
plain LoRA with A and B."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util

from configs import models as model_configs
from configs.train import train_defaults
from peftjax import methods
from peftjax.interop import export_adapter, import_adapter, peft_params
from peftjax.losses import loss_for, params_loss_fn
from peftjax.methods import saving
from peftjax.models import build_model
from peftjax.train.optim import make_optimizer
from tests.helpers import learnable_batch, tiny_model
from tests.peft_peer import TOL, checkpoint, max_delta, ours, perturb, task_type, theirs

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def ours_config(family: str, **kw) -> dict:
    return {"rank": 4, "alpha": 8.0, "targets": r"\.(" + "|".join(TARGETS[family]) + ")$", **kw}


def test_a_is_frozen_state_drawn_with_loras_init():
    model, base = tiny_model("bert")
    m = methods.create("lora_fa", model, {"rank": 4})
    p = m.setup(jax.random.PRNGKey(0), base)
    assert set(p.trainable["added"]) == {f"{s}.lora_B" for s in m.targets}
    assert set(p.state) == {f"{s}.lora_A" for s in m.targets}
    for s in m.targets:
        a = np.asarray(p.state[s + ".lora_A"])
        bound = 1 / math.sqrt(a.shape[0])                      # LoRA's kaiming_uniform(a=√5)
        assert a.shape == (32, 4) and 0.8 * bound < np.abs(a).max() <= bound
        assert not np.asarray(p.trainable["added"][s + ".lora_B"]).any()
    other = methods.create("lora_fa", model, {"rank": 4}).setup(jax.random.PRNGKey(1), base)
    assert not np.array_equal(np.asarray(other.state[m.targets[0] + ".lora_A"]),
                              np.asarray(p.state[m.targets[0] + ".lora_A"]))   # the run's rng


def test_update_and_b_gradient_are_the_written_formula():
    """h = x W0 + s·x A B, i.e. the kernel W0 + s·A B, in the one-GEMM path and the two-term
    path; B's gradient (through LoRA's custom VJP, A from the state) equals autodiff of that
    formula; merging gives that kernel."""
    model, base = tiny_model("llama")
    m = methods.create("lora_fa", model, {"rank": 4, "alpha": 16.0})
    p = m.setup(jax.random.PRNGKey(0), base)
    rng = np.random.default_rng(0)
    added = {k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32) * 0.1)
             for k, v in p.trainable["added"].items()}
    trainable = {**p.trainable, "added": added}
    batch = learnable_batch(model)
    loss = params_loss_fn(model)

    def manual_base(added):
        out = dict(base)
        for s in m.targets:
            out[s + ".kernel"] = base[s + ".kernel"] + m.scaling * p.state[s + ".lora_A"] @ added[s + ".lora_B"]
        return out

    plain = np.asarray(jax.jit(model.apply)(traverse_util.unflatten_dict(manual_base(added), sep="."), batch))
    apply = lambda t: m.apply(t, p.frozen, p.state, batch)    # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(apply)(trainable)), plain, atol=1e-4)
    want = jax.jit(jax.grad(lambda ad: loss(manual_base(ad), batch)))(added)
    got = jax.jit(jax.grad(lambda ad: loss_for(model.head)(apply({**trainable, "added": ad}), batch)))(added)
    for k in added:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-4, atol=1e-6)
    m.merged_forward = lambda *args: False                      # the two-term path
    np.testing.assert_allclose(np.asarray(jax.jit(apply)(trainable)), plain, atol=1e-4)
    merged = m.merged_params(trainable, p.frozen, p.state)
    for s in m.targets:
        np.testing.assert_allclose(np.asarray(merged[s + ".kernel"]),
                                   np.asarray(manual_base(added)[s + ".kernel"]), atol=1e-6)


def test_projection_is_the_written_formula():
    model, base = tiny_model("bert")
    m = methods.create("lora_fa", model, {"rank": 4, "alpha": 8.0, "gradient_projection": True})
    p = m.setup(jax.random.PRNGKey(0), base)
    tx = m.gradient_transform(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x)).astype(np.float32)),
                         p.trainable)
    out, _ = tx.update(grads, tx.init(p.trainable), p.trainable, method_state=p.state)
    for s in m.targets:
        a = np.asarray(p.state[s + ".lora_A"], np.float64)
        g = np.asarray(grads["added"][s + ".lora_B"], np.float64)
        want = np.linalg.solve(a.T @ a, g) / m.scaling ** 2           # (AᵀA)⁻¹ g_B / s²
        np.testing.assert_allclose(np.asarray(out["added"][s + ".lora_B"]), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["head"]["classifier.kernel"]),
                                  np.asarray(grads["head"]["classifier.kernel"]))
    with pytest.raises(ValueError, match="method_state"):
        tx.update(grads, tx.init(p.trainable), p.trainable)


def test_projected_training_equals_peft_lorafa_optimizer(monkeypatch):
    """Three steps of peftjax's optimizer chain (projection, AdamW at PEFT's settings) from one
    start against PEFT's LoraFAOptimizer on the same batch: B and the head agree. PEFT projects
    under bf16 autocast where bf16 is available (turned off here: float32 both ways) and adds ε
    before its bias correction (ε set tiny both ways, where the two AdamW forms agree)."""
    import peft.optimizers.lorafa as lorafa

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda *a, **k: False)
    net, model, params, batch = checkpoint("bert")
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    labels = np.array([0, 2], np.int32)
    m = methods.create("lora_fa", model, ours_config("bert", gradient_projection=True))
    p = m.setup(jax.random.PRNGKey(0), params)
    start = {**p.trainable, "added": perturb(p.trainable["added"], 5, 0.1)}

    pm = peft.get_peft_model(net, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                  target_modules=TARGETS["bert"]))
    modules = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for s in m.targets:
            modules[s].lora_A["default"].weight.copy_(torch.from_numpy(np.array(p.state[s + ".lora_A"]).T))
            modules[s].lora_B["default"].weight.copy_(torch.from_numpy(np.array(start["added"][s + ".lora_B"]).T))
    opt = lorafa.create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.0)
    for group in opt.param_groups:
        group["eps"] = 1e-12
    torch_batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
    for _ in range(3):
        out = pm(**torch_batch, labels=torch.from_numpy(labels.astype(np.int64)))
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    cfg = ml_collections.ConfigDict({**train_defaults(), "warmup_steps": 0, "warmup_ratio": 0.0,
                                     "schedule": "constant", "learning_rate": 1e-2,
                                     "weight_decay": 0.0, "eps": 1e-12, "clip_norm": 0.0})
    tx, _ = make_optimizer(cfg, 10, m)
    ours_batch = {**batch, "labels": labels, "mask": np.ones(2, bool)}
    def loss(trainable):
        return loss_for("classification")(m.apply(trainable, p.frozen, p.state, ours_batch), ours_batch)

    @jax.jit
    def step(trainable, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(trainable), opt_state, trainable,
                                       method_state=p.state)
        return jax.tree.map(lambda a, u: a + u, trainable, updates), opt_state

    trainable, opt_state = start, tx.init(start)
    for _ in range(3):
        trainable, opt_state = step(trainable, opt_state)
    theirs_b = {s: modules[s].lora_B["default"].weight.detach().numpy().T for s in m.targets}
    moved = max(float(np.abs(theirs_b[s] - np.asarray(start["added"][s + ".lora_B"])).max())
                for s in m.targets)
    assert moved > 1e-2                                          # training moved B
    for s in m.targets:
        # Adam divides by √v: an entry whose gradients are near 0 amplifies float rounding
        # (torch vs XLA), so the bound is 1% of how far B moved (a wrong projection moves every
        # entry by O(moved)).
        np.testing.assert_allclose(np.asarray(trainable["added"][s + ".lora_B"]), theirs_b[s],
                                   atol=0.01 * moved)
        np.testing.assert_array_equal(modules[s].lora_A["default"].weight.detach().numpy().T,
                                      np.asarray(p.state[s + ".lora_A"]))
    head = modules["classifier"].modules_to_save["default"]
    np.testing.assert_allclose(np.asarray(trainable["head"]["classifier.kernel"]),
                               head.weight.detach().numpy().T, atol=0.01 * moved)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_counts_equal_peft_lorafa(family):
    """PEFT's count after create_lorafa_optimizer (which sets lora_A requires_grad=False)."""
    from peft.optimizers import create_lorafa_optimizer

    net, model, _, _ = checkpoint(family)
    m = methods.create("lora_fa", model, ours_config(family))
    pm = peft.get_peft_model(net, peft.LoraConfig(task_type=task_type(family), r=4, lora_alpha=8,
                                                  target_modules=TARGETS[family]))
    create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-3)
    counts = methods.count_params(m)
    assert counts["trainable_params"] + counts["head_params"] == pm.get_nb_trainable_parameters()[0]
    assert counts["trainable_params"] == sum(4 * m.sites.linear[s]["out_features"] for s in m.targets)


def test_files_hold_a_and_peft_export_is_a_plain_lora(tmp_path):
    net, model, params, batch = checkpoint("bert")
    m = methods.create("lora_fa", model, ours_config("bert"))
    p = m.setup(jax.random.PRNGKey(0), params)
    trained = {"base": {}, "added": perturb(p.trainable["added"], 4, 0.3),
               "head": perturb(p.trainable["head"], 2)}
    p = p._replace(trainable=trained)
    saving.save_adapter(str(tmp_path / "ours"), m, trained, p.state)
    back, trainable, state, frozen = saving.load_adapter(str(tmp_path / "ours"), model, params)
    assert set(state) == set(p.state) and back.name == "lora_fa"
    assert max_delta(ours(back, p._replace(trainable=trainable, frozen=frozen, state=state), batch),
                     ours(m, p, batch), batch) == 0.0

    with pytest.raises(ValueError, match="method state"):
        export_adapter(m, trained, str(tmp_path / "peft"))
    config = export_adapter(m, trained, str(tmp_path / "peft"), state=p.state)
    assert config["peft_type"] == "LORA" and config["r"] == 4
    loaded = peft.PeftModel.from_pretrained(net, str(tmp_path / "peft")).eval()
    delta = max_delta(ours(m, p, batch), theirs(loaded, batch), batch)
    print(f"\nbert lora_fa peftjax→PEFT: max|Δ| {delta:.2e}")
    assert delta <= TOL
    lora, imported = import_adapter(str(tmp_path / "peft"), model)
    assert lora.name == "lora"           # PEFT records no frozen A: the file is LoRA's
    np.testing.assert_array_equal(
        np.asarray(imported["added"][m.targets[0] + ".lora_A"]), np.asarray(p.state[m.targets[0] + ".lora_A"]))
    assert max_delta(ours(lora, peft_params(lora, imported, params), batch), ours(m, p, batch), batch) <= 1e-6


def test_counts_on_roberta_base():
    model = build_model(model_configs.get("roberta-base").hf_config, head="classification", num_labels=2)
    counts = methods.count_params(methods.create("lora_fa", model, {"rank": 8, "targets": r"\.(query|value)$"}))
    assert counts["trainable_params"] == 12 * 2 * 8 * 768 == 147_456


def test_projected_variant_trains_b_only_through_the_train_step():
    """The contract's training clauses with the projection on (the train step hands the method
    state to the optimizer chain): the loss falls, A stays bit-identical, only B has moments."""
    from tests.methods.test_contract import Case, check_optimizer_state, check_training

    c = Case("lora_fa", "bert", config={"rank": 4, "alpha": 8.0, "gradient_projection": True})
    check_training(c)
    check_optimizer_state(c)
    for k, v in c.peft.state.items():
        np.testing.assert_array_equal(np.asarray(c.state.method_state[k]), np.asarray(v), err_msg=k)

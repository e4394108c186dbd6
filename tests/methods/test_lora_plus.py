"""LoRA+ specifics: B's update is λ × plain AdamW's (hand-written AdamW on the first step, plain
LoRA's optimizer after), A's unchanged; the params that get λ are those PEFT's
create_loraplus_optimizer gives λ·lr; counts equal PEFT's; the PEFT file is a plain LoRA."""

from __future__ import annotations

import re

import jax
import ml_collections
import numpy as np
import peft
import pytest
import torch

from configs import models as model_configs
from configs.train import train_defaults
from peftjax import methods
from peftjax.interop import export_adapter, import_adapter, peft_params
from peftjax.models import build_model, hf_io
from peftjax.train.optim import make_optimizer
from tests.helpers import tiny_model
from tests.peft_peer import TOL, checkpoint, max_delta, ours, perturb, task_type, theirs, trainable_count

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
LR, WD, EPS = 1e-3, 0.01, 1e-8


def ours_config(family: str, **kw) -> dict:
    return {"rank": 4, "alpha": 8.0, "targets": r"\.(" + "|".join(TARGETS[family]) + ")$", **kw}


def _cfg() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**train_defaults(), "warmup_steps": 0, "warmup_ratio": 0.0,
                                      "schedule": "constant", "learning_rate": LR,
                                      "weight_decay": WD, "eps": EPS, "clip_norm": 0.0})


def _random_tree(peft_params_, seed: int, scale: float = 1.0) -> dict:
    leaves, treedef = jax.tree.flatten(peft_params_)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, np.shape(x))
                                        for k, x in zip(keys, leaves)])


def test_b_update_is_ratio_times_plain_adamw_and_a_unchanged():
    model, base = tiny_model("bert")
    plus = methods.create("lora_plus", model, {"rank": 4, "lr_ratio": 16.0})
    plain = methods.create("lora", model, {"rank": 4})
    params = _random_tree(plus.setup(jax.random.PRNGKey(0), base).trainable, 0)
    tx_plus, _ = make_optimizer(_cfg(), 10, plus)
    tx_plain, _ = make_optimizer(_cfg(), 10, plain)
    s_plus, s_plain = tx_plus.init(params), tx_plain.init(params)
    for t in range(3):
        grads = _random_tree(params, 10 + t, 0.1)
        u_plus, s_plus = tx_plus.update(grads, s_plus, params)
        u_plain, s_plain = tx_plain.update(grads, s_plain, params)
        if t == 0:  # AdamW's first step written out: m̂ = g, v̂ = g², u = −η (g/(|g|+ε) + wd·θ)
            for key, g in grads["added"].items():
                theta = np.asarray(params["added"][key])
                g = np.asarray(g)
                hand = -LR * (g / (np.abs(g) + EPS) + WD * theta)
                ratio = 16.0 if key.endswith(".lora_B") else 1.0
                np.testing.assert_allclose(np.asarray(u_plus["added"][key]), ratio * hand,
                                           rtol=1e-5, atol=1e-9, err_msg=key)
        for key in params["added"]:
            want = np.asarray(u_plain["added"][key]) * (16.0 if key.endswith(".lora_B") else 1.0)
            np.testing.assert_allclose(np.asarray(u_plus["added"][key]), want, rtol=1e-6, err_msg=key)
        # the head: its kernel at η, its bias (1-D, PEFT's ndim == 1 rule) at 16η, no decay
        np.testing.assert_array_equal(np.asarray(u_plus["head"]["classifier.kernel"]),
                                      np.asarray(u_plain["head"]["classifier.kernel"]))
        np.testing.assert_allclose(np.asarray(u_plus["head"]["classifier.bias"]),
                                   16 * np.asarray(u_plain["head"]["classifier.bias"]), rtol=1e-6)


def _our_multiplier(method, key: str) -> float:
    return next((m for rx, m in method.lr_multipliers() if re.search(rx, key)), 1.0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_ratio_params_and_counts_equal_peft(family):
    """Every trainable tensor's rate multiplier equals PEFT's create_loraplus_optimizer group lr
    / lr (same tensors: LoRA's, plus the head as modules_to_save); counts equal PEFT's."""
    from peft.optimizers import create_loraplus_optimizer

    net, model, _, _ = checkpoint(family)
    method = methods.create("lora_plus", model, ours_config(family, lr_ratio=16.0))
    pm = peft.get_peft_model(net, peft.LoraConfig(task_type=task_type(family), r=4, lora_alpha=8,
                                                  target_modules=TARGETS[family]))
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    names = {id(p): n for n, p in pm.named_parameters()}
    theirs_mult = {}
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)].removeprefix("base_model.model.")
            n = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", n)
            n = n.replace(".modules_to_save.default.", ".")
            theirs_mult[n] = group["lr"] / 1e-3
    head = {hf_io.hf_name(p)[0]: p for p in method.partition(checkpoint(family)[2])[1]}
    assert len(theirs_mult) == 2 * len(method.targets) + len(head)
    for name, mult in theirs_mult.items():
        key = f"head.{head[name]}" if name in head else f"added.{name}"
        assert _our_multiplier(method, key) == pytest.approx(mult), (name, key)
    counts = methods.count_params(method)
    expected = trainable_count(family, peft.LoraConfig(task_type=task_type(family), r=4, lora_alpha=8,
                                                       target_modules=TARGETS[family]))
    assert counts["trainable_params"] + counts["head_params"] == expected


def test_peft_file_is_a_plain_lora(tmp_path):
    net, model, params, batch = checkpoint("bert")
    method = methods.create("lora_plus", model, ours_config("bert"))
    p = method.setup(jax.random.PRNGKey(0), params)
    trained = {"base": {}, "added": perturb(p.trainable["added"], 4, 0.3),
               "head": perturb(p.trainable["head"], 2)}
    p = p._replace(trainable=trained)
    config = export_adapter(method, trained, str(tmp_path))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(net, str(tmp_path)).eval()
    assert max_delta(ours(method, p, batch), theirs(loaded, batch), batch) <= TOL
    back, trainable = import_adapter(str(tmp_path), model)
    assert back.name == "lora"       # PEFT records no learning rates: the file is LoRA's
    assert max_delta(ours(back, peft_params(back, trainable, params), batch),
                     ours(method, p, batch), batch) <= 1e-6


def test_counts_on_roberta_base():
    model = build_model(model_configs.get("roberta-base").hf_config, head="classification", num_labels=2)
    counts = methods.count_params(methods.create("lora_plus", model,
                                                 {"rank": 8, "targets": r"\.(query|value)$"}))
    assert counts["trainable_params"] == 12 * 2 * 8 * (768 + 768) == 294_912

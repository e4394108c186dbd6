"""PEFT interop of a base-rewriting LoRA init (PiSSA here; OLoRA in tests/methods/test_olora.py).

PEFT's conventions, both ways: an adapter trained from W0 − s·A₀B₀ is exported as the
equivalent rank-2r LoRA of the *original* base (``path_initial_model_for_weight_conversion``),
which PEFT loads on the unmodified checkpoint; a file PEFT saved with
``init_lora_weights="pissa"`` imports with its residual rebuilt from the base.
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest

from peftjax.interop import AdapterError, export_adapter, import_adapter, peft_params
from peftjax.methods import core
from tests.peft_peer import TOL, checkpoint, max_delta, ours, perturb, task_type, theirs

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def regex(family: str) -> str:
    return r"\.(" + "|".join(TARGETS[family]) + ")$"


@pytest.mark.parametrize("family,use_rslora", [("bert", False), ("llama", True)])
def test_pissa_exports_as_peft_converted_lora_of_the_original_base(family, use_rslora, tmp_path):
    net, model, params, batch = checkpoint(family)
    method = core.create("lora", model, {"rank": 4, "alpha": 8.0, "init": "pissa",
                                         "use_rslora": use_rslora, "targets": regex(family)})
    p = method.setup(jax.random.PRNGKey(0), params)
    initial = p.trainable["added"]
    trained = {"base": {}, "added": perturb(initial, 3, 0.05), "head": perturb(p.trainable["head"], 2)}
    p = p._replace(trainable=trained)
    with pytest.raises(AdapterError, match="initial_added"):
        export_adapter(method, trained, str(tmp_path / "x"))
    config = export_adapter(method, trained, str(tmp_path / "a"), initial_added=initial)
    # PEFT's converted file: rank 2r, alpha scaled so the scaling is unchanged, a plain init
    assert config["r"] == 8 and config["init_lora_weights"] is True
    np.testing.assert_allclose(config["lora_alpha"], 8.0 * (2 ** 0.5 if use_rslora else 2.0))
    loaded = peft.PeftModel.from_pretrained(net, str(tmp_path / "a")).eval()  # the original base
    delta = max_delta(ours(method, p, batch), theirs(loaded, batch), batch)
    print(f"\n{family} pissa peftjax→PEFT (converted): max|Δ| {delta:.2e}")
    assert delta <= TOL
    # and back: a plain LoRA of rank 2r on the pretrained base, the same model
    back, trainable = import_adapter(str(tmp_path / "a"), model)
    assert back.name == "lora" and back.config.rank == 8 and not back.rewrites_base
    assert max_delta(ours(back, peft_params(back, trainable, params), batch),
                     ours(method, p, batch), batch) <= TOL


def test_peft_pissa_file_imports_with_the_residual_rebuilt(tmp_path):
    import torch

    net, model, params, batch = checkpoint("bert")
    pm = peft.get_peft_model(net, peft.LoraConfig(task_type=task_type("bert"), r=4, lora_alpha=8,
                                                  target_modules=TARGETS["bert"],
                                                  init_lora_weights="pissa")).eval()
    torch.manual_seed(3)
    with torch.no_grad():   # "training": every adapter tensor and the head move
        for k, v in pm.named_parameters():
            if v.requires_grad:
                v.add_(0.05 * torch.randn_like(v))
    pm.save_pretrained(str(tmp_path))   # unconverted: init_lora_weights="pissa"
    method, trainable = import_adapter(str(tmp_path), model)
    assert method.name == "lora" and method.config.init == "pissa" and method.rewrites_base
    delta = max_delta(ours(method, peft_params(method, trainable, params), batch), theirs(pm, batch), batch)
    print(f"\nbert pissa PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL


def test_conversion_refused_where_it_does_not_apply(tmp_path):
    _, model, params, _ = checkpoint("bert")
    method = core.create("dora", model, {"rank": 4, "init": "pissa", "targets": regex("bert")})
    p = method.setup(jax.random.PRNGKey(0), params)
    with pytest.raises(AdapterError, match="not a plain W0"):
        export_adapter(method, p.trainable, str(tmp_path), initial_added=p.trainable["added"])

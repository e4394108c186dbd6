"""The method protocol's shared machinery: registry, target matching, config validation."""

import pytest

from peftjax import methods
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")[0]


def test_unknown_method_lists_registered(bert):
    with pytest.raises(ValueError) as e:
        methods.create("lorra", bert)
    for name in ("lora", "full", "bitfit", "adapter", "prompt_tuning"):
        assert name in str(e.value)


def test_target_pattern_matching_nothing_lists_available_paths(bert):
    with pytest.raises(ValueError) as e:
        methods.create("lora", bert, {"targets": "q_proj|v_proj"})
    msg = str(e.value)
    assert "matches no module" in msg
    assert "bert.encoder.layer.*.attention.self.query (x2)" in msg


def test_each_list_item_must_match(bert):
    # HF PEFT silently ignores list items that match nothing when another matches; we refuse.
    with pytest.raises(ValueError, match="'nonexistent' matches no module"):
        methods.create("lora", bert, {"targets": ["query", "nonexistent"]})
    ok = methods.create("lora", bert, {"targets": ["query", "value"]})
    assert len(ok.targets) == 4


def test_invalid_regex_is_reported(bert):
    with pytest.raises(ValueError, match="not a valid regex"):
        methods.create("lora", bert, {"targets": "query("})


def test_head_is_never_a_target(bert):
    m = methods.create("lora", bert, {"targets": "dense"})
    assert not any(t.startswith("classifier") for t in m.targets)
    assert "bert.pooler.dense" in m.targets  # the pooler belongs to the backbone


@pytest.mark.parametrize("cfg,field", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 33}, "rank"),
    ({"dropout": 1.0}, "dropout"), ({"init": "xavier"}, "init"),
])
def test_bad_lora_values_name_field_and_range(bert, cfg, field):
    with pytest.raises(ValueError) as e:
        methods.create("lora", bert, cfg)
    assert f"lora.{field}=" in str(e.value) and "valid" in str(e.value)


def test_rank_larger_than_target_names_the_target(bert):
    with pytest.raises(ValueError, match=r"1\.\.32 \(target bert\.encoder\.layer\.0\.attention\.self\.query"):
        methods.create("lora", bert, {"rank": 64})


def test_unknown_config_key_lists_valid_keys(bert):
    with pytest.raises(ValueError) as e:
        methods.create("lora", bert, {"rnak": 4})
    assert "rnak" in str(e.value) and "rank" in str(e.value) and "alpha" in str(e.value)


@pytest.mark.parametrize("name,cfg,field", [
    ("adapter", {"placement": "middle"}, "placement"),
    ("adapter", {"bottleneck": 10_000}, "bottleneck"),
    ("adapter", {"activation": "swishy"}, "activation"),
    ("prompt_tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ("prompt_tuning", {"init": "text"}, "init_text"),
    ("bitfit", {"subset": "some"}, "subset"),
])
def test_other_methods_validate_before_compute(bert, name, cfg, field):
    with pytest.raises(ValueError, match=f"{name}.{field}="):
        methods.create(name, bert, cfg)


def test_bitfit_on_a_model_without_biases_says_so():
    from configs import models as model_configs
    from peftjax.models import build_model

    cfg = model_configs.get("tiny-llama").hf_config.to_dict()
    cfg.update(attention_bias=False, mlp_bias=False)
    model = build_model(cfg, head="causal_lm")
    with pytest.raises(ValueError, match="no bias terms"):
        methods.create("bitfit", model)


def test_sites_use_hugging_face_paths(bert):
    sites = methods.Sites.discover(bert)
    assert "bert.encoder.layer.0.attention.self.query" in sites.linear
    assert sites.blocks["bert.encoder.layer.1.attention.output"]["kind"] == "attention"
    assert sites.blocks["bert.encoder.layer.1.output"]["kind"] == "ffn"
    assert list(sites.embeddings) == ["bert.embeddings"]


def test_method_config_files_are_their_dataclass_defaults():
    """One source of truth: configs/methods/<name>.py equals the method's Config dataclass
    (prompt tuning's file said init='vocab' while the dataclass said 'random')."""
    import os

    from configs.train import _load
    from peftjax.methods import default_config

    names = sorted(f[:-3] for f in os.listdir("configs/methods") if f.endswith(".py"))
    assert set(methods.registered()) <= set(names)
    for name in names:
        cfg = _load("methods", name).get_config().to_dict()
        assert cfg == default_config(cfg["name"]), name
    assert default_config("prompt_tuning")["init"] == "vocab"

"""Hugging Face PEFT interop against the real ``peft`` library, both directions.

One tiny random checkpoint per family is written by transformers (safetensors) and loaded on
both sides, so the only thing that can differ is the adapter. Every adapter has a non-zero B
(PEFT: ``init_lora_weights=False``; here: B perturbed) and a perturbed head, so a dropped
lora_B, a wrong transpose, a wrong scaling or a head left at its base value all show up in the
logits. (a) peftjax → ``export_adapter`` → ``PeftModel.from_pretrained``; (b) ``PeftModel``
``.save_pretrained`` → ``import_adapter`` → peftjax; logits compared in eval mode to 1e-4.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from peftjax.interop import AdapterError, export_adapter, import_adapter, peft_params
from peftjax.methods import core
from peftjax.models import build_model, hf_io

TOL = 1e-4
HAS_DORA = "dora" in core.registered()

# peft-side configs per method; peftjax-side configs are derived from them.
METHODS = ["lora", "rslora", "prompt_tuning"] + (["dora"] if HAS_DORA else [])
TARGETS = {"bert": ["query", "value", "output.dense"],  # attention and FFN output (768→…)
           "llama": ["q_proj", "k_proj", "v_proj", "down_proj"]}  # k/v: GQA-sized outputs
OUR_TARGETS = {"bert": r"\.(query|value|output\.dense)$",
               "llama": r"\.(q_proj|k_proj|v_proj|down_proj)$"}


def _tiny_bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, num_labels=3,
                                     max_position_embeddings=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval(), "classification"


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.1)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), "causal_lm"


@pytest.fixture(scope="module", params=["bert", "llama"])
def family(request, tmp_path_factory):
    """(name, torch model, our model, flat params, batch) from one transformers checkpoint."""
    name = request.param
    torch_model, head = {"bert": _tiny_bert, "llama": _tiny_llama}[name]()
    folder = str(tmp_path_factory.mktemp(f"{name}_ckpt"))
    torch_model.save_pretrained(folder, safe_serialization=True)
    model, params = hf_io.load_pretrained(folder, head=head)
    rs = np.random.RandomState(1)
    ids = rs.randint(3, model.config.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding: positions agree with transformers' defaults
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in model.input_names:
        batch["token_type_ids"] = np.zeros_like(ids)
    return name, torch_model, model, hf_io.flatten(params), batch


_JIT: dict = {}


def ours(method, peft: core.PeftParams, batch) -> np.ndarray:
    key = id(method)
    if key not in _JIT:
        _JIT[key] = (method, jax.jit(lambda t, f, s, b: method.apply(t, f, s, b)))
    return np.asarray(_JIT[key][1](peft.trainable, peft.frozen, peft.state, batch))


def theirs(peft_model, batch, n_virtual: int = 0) -> np.ndarray:
    with torch.no_grad():
        out = peft_model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()})
    logits = out.logits.numpy()
    return logits[:, n_virtual:] if logits.ndim == 3 else logits


def max_delta(a, b, batch) -> float:
    d = np.abs(a - b)
    if d.ndim == 3:  # causal LM: valid positions only
        d = d[batch["attention_mask"].astype(bool)]
    return float(d.max())


def peft_config(method: str, family: str, **kw):
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3)
    return peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=TARGETS[family],
                           init_lora_weights=False, use_rslora=method == "rslora",
                           use_dora=method == "dora", **kw)


def adapted_modules(peft_model) -> list[str]:
    """The module paths PEFT put a LoRA layer on."""
    return sorted(k.removeprefix("base_model.model.") for k, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and "default" in m.lora_A)


def perturb(tree: dict, seed: int, scale: float = 0.3) -> dict:
    rs = np.random.RandomState(seed)
    return {k: v + scale * rs.standard_normal(v.shape).astype(np.float32) for k, v in tree.items()}


# --------------------------------------------------------------------------- (a) peftjax → PEFT


@pytest.mark.parametrize("method_name", METHODS)
def test_export_loads_in_peft_with_equal_logits(family, method_name, tmp_path):
    name, torch_model, model, params, batch = family
    if method_name == "prompt_tuning":
        method = core.create("prompt_tuning", model, {"num_virtual_tokens": 3})
    else:
        method = core.create("dora" if method_name == "dora" else "lora", model,
                             {"rank": 4, "alpha": 8.0, "targets": OUR_TARGETS[name],
                              "use_rslora": method_name == "rslora"})
    p = method.setup(jax.random.PRNGKey(0), params)
    added = dict(p.trainable["added"])
    for k in added:  # non-zero B (and magnitude, prompt): every tensor must travel
        if not k.endswith("lora_A"):
            added[k] = perturb({k: np.asarray(added[k])}, hash(k) % 1000, 0.3 if "lora_B" in k else 0.05)[k]
    head = perturb({k: np.asarray(v) for k, v in p.trainable["head"].items()}, 2)
    p = p._replace(trainable={"base": {}, "added": added, "head": head})
    config = export_adapter(method, p.trainable, str(tmp_path), base_model_name_or_path="tiny")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path)).eval()
    n = config.get("num_virtual_tokens", 0)
    if method_name != "prompt_tuning":  # PEFT targeted exactly our modules
        assert adapted_modules(loaded) == sorted(method.targets)
    delta = max_delta(ours(method, p, batch), theirs(loaded, batch, n), batch)
    print(f"\n{name} {method_name} peftjax→PEFT: max|Δ| {delta:.2e}")
    assert delta <= TOL
    if method_name == "prompt_tuning":  # (PEFT's disable_adapter fails for prompt learning)
        base = theirs(torch_model, batch)
    else:
        with loaded.disable_adapter():  # not vacuous: the adapter (and head) change the output
            base = theirs(loaded, batch)
    assert np.abs(base - theirs(loaded, batch, n)).max() > 1e-2


# --------------------------------------------------------------------------- (b) PEFT → peftjax


@pytest.mark.parametrize("method_name", METHODS)
def test_peft_saved_adapter_imports_with_equal_logits(family, method_name, tmp_path):
    name, torch_model, model, params, batch = family
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft_config(method_name, name)).eval()
    with torch.no_grad():
        for k, v in pm.named_parameters():
            if "modules_to_save" in k or "lora_magnitude" in k or "prompt" in k:
                v.add_(0.05 * torch.randn_like(v))
    pm.save_pretrained(str(tmp_path))
    method, trainable = import_adapter(str(tmp_path), model)
    assert method.name == {"rslora": "lora"}.get(method_name, method_name)
    if method_name != "prompt_tuning":
        assert method.config.use_rslora == (method_name == "rslora")
        assert sorted(method.targets) == adapted_modules(pm)  # PEFT's suffix rule, exactly
    assert set(trainable["head"]) == {k for k in params if method.sites.is_head(k)}
    p = peft_params(method, trainable, params)
    n = getattr(method.config, "num_virtual_tokens", 0)
    delta = max_delta(ours(method, p, batch), theirs(pm, batch, n), batch)
    print(f"\n{name} {method_name} PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL


def test_export_writes_what_peft_writes(family, tmp_path):
    """Same keys, shapes and the config fields that matter as PEFT's own save of that adapter."""
    name, torch_model, model, params, batch = family
    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft_config("lora", name))
    pm.save_pretrained(str(tmp_path / "peft"))
    method, trainable = import_adapter(str(tmp_path / "peft"), model)
    export_adapter(method, trainable, str(tmp_path / "ours"))
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ca = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    cb = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    for field in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "bias"):
        assert ca[field] == cb[field], field


def test_regex_target_modules_follow_peft_fullmatch(family, tmp_path):
    name, torch_model, model, params, batch = family
    regex = {"bert": r".*layer\.0\.attention\.self\.(query|value)",
             "llama": r".*layers\.1\.self_attn\.(q|k)_proj"}[name]
    pm = peft.get_peft_model(copy.deepcopy(torch_model),
                             peft_config("lora", name).__class__(
                                 task_type=peft_config("lora", name).task_type, r=2,
                                 target_modules=regex, init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path))
    method, trainable = import_adapter(str(tmp_path), model)
    peft_targets = adapted_modules(pm)
    assert sorted(method.targets) == peft_targets and len(peft_targets) == 2
    delta = max_delta(ours(method, peft_params(method, trainable, params), batch), theirs(pm, batch),
                      batch)
    assert delta <= TOL


# --------------------------------------------------------------------------- methods with state
# VeRA's shared projections and AdaLoRA's rank mask are peftjax method state: export takes it,
# import returns it (with_state=True).


def test_vera_both_ways_with_the_projections(family, tmp_path):
    name, torch_model, model, params, batch = family
    method = core.create("vera", model, {"rank": 8, "targets": OUR_TARGETS[name]})
    p = method.setup(jax.random.PRNGKey(0), params)
    added = perturb({k: np.asarray(v) for k, v in p.trainable["added"].items()}, 5, 0.3)
    head = perturb({k: np.asarray(v) for k, v in p.trainable["head"].items()}, 2)
    p = p._replace(trainable={"base": {}, "added": added, "head": head})
    config = export_adapter(method, p.trainable, str(tmp_path / "ours"), state=p.state)
    assert config["save_projection"] and config["peft_type"] == "VERA"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "ours")).eval()
    np.testing.assert_array_equal(loaded.base_model.vera_A["default"].numpy(), np.asarray(p.state["vera_A"]).T)
    np.testing.assert_array_equal(loaded.base_model.vera_B["default"].numpy(), np.asarray(p.state["vera_B"]).T)
    assert max_delta(ours(method, p, batch), theirs(loaded, batch), batch) <= TOL

    torch.manual_seed(4)   # PEFT's own adapter: its projections drawn by torch, d random, b = 1
    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft.VeraConfig(
        task_type="SEQ_CLS" if name == "bert" else "CAUSAL_LM", r=8, target_modules=TARGETS[name],
        projection_prng_key=7, init_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    method2, trainable, state = import_adapter(str(tmp_path / "peft"), model, with_state=True)
    assert method2.name == "vera" and sorted(method2.targets) == sorted(method.targets)
    assert method2.config.projection_prng_key == 7
    delta = max_delta(ours(method2, peft_params(method2, trainable, params, state), batch),
                      theirs(pm, batch), batch)
    print(f"\n{name} vera PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL


def test_vera_without_state_or_projections_is_refused(bert_adapter, tmp_path):
    _, model = bert_adapter
    method = core.create("vera", model, {"rank": 4})
    p = method.setup(jax.random.PRNGKey(0), hf_io.flatten(model.init(jax.random.PRNGKey(0))))
    with pytest.raises(AdapterError, match="needs the method state"):
        export_adapter(method, p.trainable, str(tmp_path / "a"))
    export_adapter(method, p.trainable, str(tmp_path / "a"), state=p.state)
    with pytest.raises(AdapterError, match="with_state=True"):
        import_adapter(str(tmp_path / "a"), model)
    bare = _copy(str(tmp_path / "a"), tmp_path / "b", drop=("base_model.vera_A", "base_model.vera_B"))
    with pytest.raises(AdapterError, match="save_projection=False"):
        import_adapter(bare, model, with_state=True)


def _train_peft_adalora(pm, batch, steps: int) -> None:
    """A few PEFT AdaLoRA steps with update_and_allocate, so its rank pattern prunes triplets."""
    inputs = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
    labels = torch.tensor([0, 1]) if "token_type_ids" in batch else inputs["input_ids"]
    opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-2)
    for step in range(steps):
        pm(**inputs, labels=labels).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()


def test_adalora_both_ways_with_a_pruned_rank_pattern(family, tmp_path):
    name, torch_model, model, params, batch = family
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft.AdaLoraConfig(
        task_type="SEQ_CLS" if name == "bert" else "CAUSAL_LM", init_r=4, target_r=2,
        total_step=6, tinit=1, tfinal=2, target_modules=TARGETS[name]))
    _train_peft_adalora(pm, batch, 6)
    pattern = pm.peft_config["default"].rank_pattern
    assert any(not all(v) for v in pattern.values())          # PEFT pruned some triplets
    pm.eval().save_pretrained(str(tmp_path / "peft"))
    method, trainable, state = import_adapter(str(tmp_path / "peft"), model, with_state=True)
    assert method.name == "adalora" and method.config.init_r == 4 and method.total_step == 6
    for key, keep in pattern.items():
        site = key.removesuffix(".lora_E.default")
        assert [bool(v) for v in np.asarray(state[site + ".rank_mask"])] == list(keep), site
    p = peft_params(method, trainable, params, state)
    delta = max_delta(ours(method, p, batch), theirs(pm, batch), batch)
    print(f"\n{name} adalora PEFT→peftjax: max|Δ| {delta:.2e}")
    assert delta <= TOL

    # and back: our pruned adapter is written in PEFT's resized form and loads equal
    e = {k: v + 0.3 for k, v in p.trainable["added"].items() if k.endswith(".lora_E")}
    e = {k: v * state[k.removesuffix(".lora_E") + ".rank_mask"] for k, v in e.items()}
    p = p._replace(trainable={**p.trainable, "added": {**p.trainable["added"], **e}})
    config = export_adapter(method, p.trainable, str(tmp_path / "ours"), state=state)
    assert config["rank_pattern"] == {k.removesuffix(".default"): list(v) for k, v in pattern.items()}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "ours")).eval()
    delta = max_delta(ours(method, p, batch), theirs(loaded, batch), batch)
    assert delta <= TOL


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def bert_adapter(tmp_path_factory):
    """A PEFT-saved LoRA adapter of the tiny BERT classifier, and our model of that checkpoint."""
    torch_model, head = _tiny_bert()
    ckpt = str(tmp_path_factory.mktemp("bert_ref"))
    torch_model.save_pretrained(ckpt, safe_serialization=True)
    folder = str(tmp_path_factory.mktemp("bert_adapter"))
    peft.get_peft_model(torch_model, peft_config("lora", "bert")).save_pretrained(folder)
    model, _ = hf_io.load_pretrained(ckpt, head=head)
    return folder, model


def _copy(src, dst, config_update=None, tensors_update=None, drop=()):
    shutil.copytree(src, dst)
    if config_update:
        path = os.path.join(dst, "adapter_config.json")
        config = json.load(open(path))
        config.update(config_update)
        json.dump(config, open(path, "w"))
    if tensors_update or drop:
        path = os.path.join(dst, "adapter_model.safetensors")
        t = {k: v for k, v in load_file(path).items() if k not in drop}
        t.update(tensors_update or {})
        save_file(t, path)
    return str(dst)


def test_refuses_other_hidden_size(bert_adapter):
    folder, _ = bert_adapter
    wider = build_model(transformers.BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=37,
                                                num_labels=3), head="classification")
    with pytest.raises(AdapterError, match="mis-shaped") as e:
        import_adapter(folder, wider)
    assert "encoder.layer.0.attention.self.query.lora_A.weight: adapter (4, 32), model expects (4, 48)" \
        in str(e.value)


def test_refuses_unexpected_and_missing_keys(bert_adapter, tmp_path):
    folder, model = bert_adapter
    extra = "base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight"
    bad = _copy(folder, tmp_path / "extra", tensors_update={extra: np.zeros((4, 32), np.float32)})
    with pytest.raises(AdapterError, match="unexpected keys") as e:
        import_adapter(bad, model)
    assert extra in str(e.value)
    gone = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    bad = _copy(folder, tmp_path / "missing", drop=(gone,))
    with pytest.raises(AdapterError, match="missing keys") as e:
        import_adapter(bad, model)
    assert gone in str(e.value)
    stray = "base_model.model.bert.pooler.dense.weight"  # a modules_to_save our head lacks
    bad = _copy(folder, tmp_path / "stray", tensors_update={stray: np.zeros((32, 32), np.float32)})
    with pytest.raises(AdapterError, match="unexpected keys") as e:
        import_adapter(bad, model)
    assert stray in str(e.value)


@pytest.mark.parametrize("update, message", [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported; supported peft types: LORA, ADALORA, VERA, PROMPT_TUNING"),
    ({"rank_pattern": {"query": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"query": 8}}, "alpha_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"bias": "all"}, "bias='all'"),
    ({"init_lora_weights": "corda"}, "no registered LoRA variant implements it"),
    ({"init_lora_weights": "pissa_niter_4"}, "no registered LoRA variant implements it"),
    ({"task_type": "CAUSAL_LM"}, "task_type 'CAUSAL_LM' does not fit"),
    ({"target_modules": ["nonexistent"]}, "matches no module"),
])
def test_refuses_unsupported_config(bert_adapter, tmp_path, update, message):
    folder, model = bert_adapter
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace(".", r"\.").replace("*", r"\*")):
        import_adapter(_copy(folder, tmp_path / "a", config_update=update), model)


def test_refuses_pickled_weights(bert_adapter, tmp_path):
    folder, model = bert_adapter
    dst = tmp_path / "pickled"
    shutil.copytree(folder, dst)
    os.rename(dst / "adapter_model.safetensors", dst / "adapter_model.bin")
    with pytest.raises(AdapterError, match="never unpickles"):
        import_adapter(str(dst), model)


def test_refuses_head_that_does_not_fit(bert_adapter):
    folder, _ = bert_adapter
    five = build_model(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=37,
                                               num_labels=5), head="classification")
    with pytest.raises(AdapterError, match="mis-shaped head keys") as e:
        import_adapter(folder, five)
    assert "base_model.model.classifier.weight: adapter (3, 32), model expects (5, 32)" in str(e.value)


@pytest.mark.parametrize("method_name", ["lora", "prompt_tuning"])
def test_export_refuses_a_mean_pooling_head(method_name, tmp_path):
    """transformers' BertForSequenceClassification always classifies the pooler's [CLS] vector:
    a PEFT adapter of a mean-pooling head would load and silently classify something else."""
    model = build_model(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=37,
                                                num_labels=3), head="classification", pooling="mean")
    config = {"num_virtual_tokens": 3} if method_name == "prompt_tuning" else {"rank": 4}
    method = core.create(method_name, model, config)
    peft_ = method.setup(jax.random.PRNGKey(0), hf_io.flatten(model.init(jax.random.PRNGKey(0))))
    with pytest.raises(AdapterError, match=r"pooling='mean' head cannot be exported as a PEFT "
                       r"adapter.*peftjax's own format.*pooling='cls'"):
        export_adapter(method, peft_.trainable, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    # and a PEFT adapter (from the same architecture with transformers' head) is not loaded
    # onto a mean-pooling model either
    cls_model = build_model(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=37,
                                                    num_labels=3), head="classification")
    cls_method = core.create(method_name, cls_model, config)
    cls_peft = cls_method.setup(jax.random.PRNGKey(0), hf_io.flatten(cls_model.init(jax.random.PRNGKey(0))))
    export_adapter(cls_method, cls_peft.trainable, str(tmp_path / "cls"))
    with pytest.raises(AdapterError, match=r"pooling='mean' head cannot be loaded from a PEFT adapter"):
        import_adapter(str(tmp_path / "cls"), model)


# --------------------------------------------------------------------------- GPT-2 (Conv1D)


def test_gpt2_conv1d_lora_both_ways(tmp_path):
    """GPT-2's c_attn is a Conv1D (weight stored (in, out)): PEFT saves fan_in_fan_out=True with
    nn.Linear-shaped lora_A/B; both directions agree with PEFT to 1e-4."""
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel(config).eval()
    torch_model.save_pretrained(str(tmp_path / "ckpt"), safe_serialization=True)
    model, params = hf_io.load_pretrained(str(tmp_path / "ckpt"), head="causal_lm")
    params = hf_io.flatten(params)
    ids = np.random.RandomState(1).randint(0, 96, (2, 9)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"],
        init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    assert json.load(open(tmp_path / "peft" / "adapter_config.json"))["fan_in_fan_out"] is True
    method, trainable = import_adapter(str(tmp_path / "peft"), model)
    assert sorted(method.targets) == adapted_modules(pm)
    p = peft_params(method, trainable, params)
    assert max_delta(ours(method, p, batch), theirs(pm, batch), batch) <= TOL

    config_out = export_adapter(method, trainable, str(tmp_path / "ours"))
    assert config_out["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(tmp_path / "ours")).eval()
    assert max_delta(ours(method, p, batch), theirs(loaded, batch), batch) <= TOL
    with loaded.disable_adapter():   # not vacuous: the adapter changes the output
        assert np.abs(theirs(loaded, batch) - ours(method, p, batch)).max() > 1e-3

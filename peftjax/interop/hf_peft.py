"""Hugging Face PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``) ↔ peftjax.

``export_adapter`` writes a folder that ``peft.PeftModel.from_pretrained(torch_model, folder)``
loads onto the transformers model of the same checkpoint; ``import_adapter`` reads a folder
that PEFT saved and returns the peftjax method and its trainable tree. Supported: LoRA, rsLoRA
(``use_rslora``), DoRA (``use_dora``, when ``peftjax.methods.dora`` is present) and prompt
tuning, with the task head carried as PEFT's ``modules_to_save``.

Name mapping (verified against files PEFT itself writes, ``tests/interop``): a peftjax site
*is* the transformers module path (``bert.encoder.layer.0.attention.self.query``), so

    peftjax ``<site>.lora_A`` (in, r)   ↔  ``base_model.model.<site>.lora_A.weight`` (r, in)
    peftjax ``<site>.lora_B`` (r, out)  ↔  ``base_model.model.<site>.lora_B.weight`` (out, r)
    DoRA magnitude (out,)               ↔  ``base_model.model.<site>.lora_magnitude_vector``
    prompt ``<emb site>.prompt_embeddings`` (n, d)  ↔  ``prompt_embeddings`` (n, d)
    head ``classifier.kernel`` (in, out) ↔  ``base_model.model.classifier.weight`` (out, in)
                                           (``base_model.classifier.weight`` for prompt tuning:
                                           a prompt-learning PeftModel has no tuner wrapper)

``target_modules`` is exported as the explicit list of adapted module paths: PEFT matches a
list item by equality or ``.``-suffix, so a full path targets exactly that module and nothing
else. On import, PEFT's matching rule (list: equal or suffix; string: ``re.fullmatch``;
``"all-linear"``) is translated into a peftjax target regex, and the set of modules it selects
must equal the set of modules the file holds weights for.

Anything that does not fit is refused with a message that lists each missing, unexpected or
mis-shaped key, or the config field that peftjax does not implement — never a silent partial
load. Weights are read with safetensors only; pickled ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable

import jax
import numpy as np

from peftjax.files import atomic_write, write_json_atomic
from peftjax.methods import core
from peftjax.models import hf_io
from peftjax.models.registry import Model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
SUPPORTED_PEFT_TYPES = ("LORA", "PROMPT_TUNING")

# peftjax method name -> the extra per-site tensors it stores besides lora_A / lora_B:
# {PEFT key suffix (after "<module>."): peftjax added-param name (after "<site>.")}. A new
# LoRA-family method that PEFT expresses as a LoRA flag is one entry here and in _LORA_FLAGS.
LOW_RANK_EXTRA: dict[str, dict[str, str]] = {"lora": {}, "dora": {"lora_magnitude_vector": "lora_magnitude"}}
_LORA_FLAGS = {"lora": {}, "dora": {"use_dora": True}}


class AdapterError(ValueError):
    """An adapter that cannot be exported or imported; the message says exactly why."""


# --------------------------------------------------------------------------------------------
# Helpers shared by both directions.


def task_type(model: Model) -> str:
    """PEFT's task type for the model's head."""
    return {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "causal_lm": "CAUSAL_LM",
            "seq2seq_lm": "SEQ_2_SEQ_LM", "none": "FEATURE_EXTRACTION"}[model.head]


def _head_params(model: Model) -> dict[str, Any]:
    """Flat abstract params of the task head (trained by every method)."""
    sites = core.Sites.discover(model)
    return {p: v for p, v in hf_io.flatten(model.abstract_params()).items() if sites.is_head(p)}


def modules_to_save(model: Model) -> list[str]:
    """Top-level head modules as PEFT names them (``classifier`` for BERT and RoBERTa, ``score``)."""
    return sorted({p.split(".")[0] for p in core.Sites.discover(model).head_prefixes})


def _lora_like(method: core.Method) -> bool:
    return method.name in LOW_RANK_EXTRA


def _to_numpy(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def _listing(title: str, items: list[str], limit: int = 40) -> str:
    more = f" ... (+{len(items) - limit})" if len(items) > limit else ""
    return f"{title} ({len(items)}): {', '.join(items[:limit])}{more}"


# --------------------------------------------------------------------------------------------
# Export.


def export_adapter(method: core.Method, trainable: dict, folder: str, *,
                   base_model_name_or_path: str = "") -> dict:
    """Writes ``trainable`` (``{"base","added","head"}``) as a PEFT adapter folder.

    Returns the adapter config written. Both files are written to a temporary name and
    renamed, the weights first, so an interrupted export never leaves a config whose weights
    are missing or stale.
    """
    from safetensors.numpy import save_file

    model = method.model
    _check_head_representable(model, "exported as")
    if trainable.get("base"):
        raise AdapterError(f"method {method.name!r} trains base params ({len(trainable['base'])}, "
                           f"e.g. {next(iter(trainable['base']))}); a PEFT LoRA/prompt adapter cannot "
                           "carry them")
    added = trainable.get("added", {})
    if _lora_like(method):
        config, tensors, prefix = _export_lora(method, added)
    elif method.name == "prompt_tuning":
        config, tensors, prefix = _export_prompt(method, added)
    else:
        raise AdapterError(f"method {method.name!r} has no Hugging Face PEFT equivalent here; "
                           f"exportable methods: {', '.join(sorted([*LOW_RANK_EXTRA, 'prompt_tuning']))}")
    head = trainable.get("head", {})
    expected = _head_params(model)
    if set(head) != set(expected):
        raise AdapterError(_listing("head params do not match the model's head; missing",
                                    sorted(set(expected) - set(head)))
                           + "; " + _listing("unexpected", sorted(set(head) - set(expected))))
    for path, value in head.items():
        name, transpose = hf_io.hf_name(path)
        array = _to_numpy(value)
        tensors[prefix + name] = np.ascontiguousarray(array.T) if transpose else array
    config.update(task_type=task_type(model), base_model_name_or_path=base_model_name_or_path or None,
                  inference_mode=True, revision=None,
                  modules_to_save=modules_to_save(model) or None)
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, WEIGHTS_NAME),
                  lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json_atomic(os.path.join(folder, CONFIG_NAME), config, indent=2, sort_keys=True)
    return config


def _check_head_representable(model: Model, verb: str) -> None:
    """Refuses a task head that PEFT's models cannot represent (a mean-pooling head).

    transformers' BertForSequenceClassification always classifies tanh(pooler(h[CLS])),
    RobertaForSequenceClassification the <s> state: PEFT has no way to say "mean of the tokens",
    so a PEFT adapter and a peftjax mean-pooling model would classify different vectors.
    """
    if model.pooling == "mean" and model.head in ("classification", "regression"):
        raise AdapterError(
            f"a pooling='mean' head cannot be {verb} a PEFT adapter: transformers' "
            f"{model.config.model_type} sequence classifiers always read the first token "
            "([CLS] through the pooler, or <s>). Keep the adapter in peftjax's own format "
            "(peftjax.methods.saving.save_adapter; training writes it to <workdir>/adapter/), "
            "or use pooling='cls' (--config.model.pooling=cls) to move adapters to and from PEFT")


def _conv1d_targets(model: Model, targets) -> bool:
    """Whether every target is a Conv1D layer (a kernel the checkpoint stores untransposed)."""
    pattern = getattr(model.family, "untransposed_kernels", "")
    return bool(pattern) and bool(targets) and all(re.search(pattern, t + ".kernel") for t in targets)


def _export_lora(method, added) -> tuple[dict, dict, str]:
    c = method.config
    if method.rewrites_base:
        raise AdapterError(f"{method.name} with init={c.init!r} trains against a rewritten base "
                           "kernel (PiSSA: W0 - s·A0 B0) that a PEFT adapter folder does not carry; "
                           "export requires a LoRA whose base is the unmodified pretrained model")
    prefix = "base_model.model."
    extra = LOW_RANK_EXTRA[method.name]
    tensors: dict[str, np.ndarray] = {}
    expected = {f"{s}.{n}" for s in method.targets for n in ("lora_A", "lora_B", *extra.values())}
    if set(added) != expected:
        raise AdapterError(_listing(f"{method.name} added params do not match its targets; missing",
                                    sorted(expected - set(added)))
                           + "; " + _listing("unexpected", sorted(set(added) - expected)))
    for site in method.targets:
        tensors[f"{prefix}{site}.lora_A.weight"] = _to_numpy(added[site + ".lora_A"]).T.copy()
        tensors[f"{prefix}{site}.lora_B.weight"] = _to_numpy(added[site + ".lora_B"]).T.copy()
        for peft_key, ours in extra.items():
            tensors[f"{prefix}{site}.{peft_key}"] = _to_numpy(added[f"{site}.{ours}"])
    config = {
        "peft_type": "LORA", "r": int(c.rank), "lora_alpha": float(c.alpha),
        "lora_dropout": float(c.dropout), "use_rslora": bool(c.use_rslora),
        "target_modules": list(method.targets), "bias": "none",
        # PEFT's flag for Conv1D (GPT-2) layers, whose weight is stored (in, out); lora_A/B have
        # the nn.Linear shapes either way. PEFT's own save writes True for such targets.
        "fan_in_fan_out": _conv1d_targets(method.model, method.targets),
        "init_lora_weights": "gaussian" if c.init == "gaussian" else True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "use_dora": False, "lora_bias": False,
    }
    config.update(_LORA_FLAGS[method.name])
    return config, tensors, prefix


def _export_prompt(method, added) -> tuple[dict, dict, str]:
    hf = method.model.hf_config
    prompt = _to_numpy(added[f"{method.site}.prompt_embeddings"])
    config = {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]), "num_transformer_submodules": 1,
        "num_attention_heads": int(hf.num_attention_heads), "num_layers": int(hf.num_hidden_layers),
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
    }
    return config, {"prompt_embeddings": prompt}, "base_model."


# --------------------------------------------------------------------------------------------
# Import.


def read_adapter(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter config, tensors) of a PEFT adapter folder; safetensors only, never unpickled."""
    from safetensors.numpy import load_file

    if not os.path.isdir(folder):
        raise AdapterError(f"adapter folder {folder!r} does not exist")
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder")
    with open(cfg_path) as f:
        config = json.load(f)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(weights):
        pickled = [n for n in PICKLED_NAMES if os.path.exists(os.path.join(folder, n))]
        if pickled:
            raise AdapterError(
                f"{folder} holds only pickled adapter weights ({', '.join(pickled)}); peftjax never "
                "unpickles files (loading a pickle can run arbitrary code). Re-save the adapter with "
                "safetensors in a trusted environment: PeftModel.from_pretrained(model, folder)"
                ".save_pretrained(out, safe_serialization=True)")
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    return config, load_file(weights)


def import_adapter(folder: str, model: Model, *, require_head: bool = True
                   ) -> tuple[core.Method, dict]:
    """Loads a PEFT-saved adapter for ``model``: ``(method, trainable)``.

    ``trainable`` is ``{"base": {}, "added": {...}, "head": {...}}``; combine it with the base
    params with ``peft_params`` (or ``method.partition``). When the model has a task head the
    adapter must carry it (``modules_to_save``) unless ``require_head=False``, in which case
    ``trainable["head"]`` is empty and the caller supplies the head.
    """
    config, tensors = read_adapter(folder)
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterError(f"{folder}: peft_type {peft_type!r} is not supported; supported peft "
                           f"types: {', '.join(SUPPORTED_PEFT_TYPES)}")
    _check_task_type(config, model, folder)
    _check_head_representable(model, "loaded from")
    if peft_type == "LORA":
        method, added, prefix = _import_lora(config, tensors, model, folder)
    else:
        method, added, prefix = _import_prompt(config, tensors, model, folder)
    head, unexpected = _import_head(tensors, model, prefix, folder, require_head)
    if unexpected:
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  "
                           + _listing("unexpected keys", sorted(unexpected)))
    return method, {"base": {}, "added": added, "head": head}


def peft_params(method: core.Method, trainable: dict, base: dict) -> core.PeftParams:
    """``PeftParams`` from imported ``trainable`` and the model's (flat or nested) base params.

    The imported head replaces the base params' head; when the import carried none the base
    params' head is kept.
    """
    flat = base if all(isinstance(k, str) and not isinstance(v, dict) for k, v in base.items()) \
        else hf_io.flatten(base)
    train, head, frozen = method.partition(flat)
    head = {**head, **trainable["head"]}
    return core.PeftParams({"base": train, "added": dict(trainable["added"]), "head": head},
                           frozen, {})


def _check_task_type(config: dict, model: Model, folder: str) -> None:
    tt = config.get("task_type")
    ok = {"SEQ_CLS": ("classification", "regression"), "CAUSAL_LM": ("causal_lm",),
          "SEQ_2_SEQ_LM": ("seq2seq_lm",)}
    if tt in ok and model.head not in ok[tt]:
        raise AdapterError(f"{folder}: task_type {tt!r} does not fit a model with head "
                           f"{model.head!r} (expected head: {' or '.join(ok[tt])})")


def _strip_prefix(keys: Iterable[str], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def _module_map(model: Model, modules: Iterable[str]) -> dict[str, str]:
    """File module path -> our site path. A bare model (no backbone prefix) accepts an adapter
    saved on a headed model of its family (``model.layers.0...`` → ``layers.0...``)."""
    modules = list(modules)
    if model.backbone_prefix == "" and modules:
        for head in model.family.heads:
            p = model.family.backbone_prefix(model.config, head)
            if p and all(m.startswith(p + ".") for m in modules):
                return {m: m[len(p) + 1:] for m in modules}
    return {m: m for m in modules}


def _peft_targets_regex(target_modules: Any, sites: core.Sites) -> str:
    """PEFT's module matching as a peftjax target regex (``re.search`` over site paths)."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            # PEFT: every linear layer except the output layer (lm_head / the head).
            names = [s for s in sites.backbone_linear if s.split(".")[-1] != "lm_head"]
            return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
        return f"^(?:{target_modules})$"
    if not target_modules:
        raise AdapterError("target_modules is empty")
    items = "|".join(re.escape(t) for t in target_modules)
    return rf"(?:^|\.)(?:{items})$"


_REFUSED_LORA_FIELDS = {
    # field: (value that is fine, why peftjax refuses other values)
    "lora_bias": (False, "lora_bias=True (a trainable bias on lora_B) is not implemented"),
    "layers_to_transform": (None, "layers_to_transform (adapting a subset of layers) is not "
                                  "implemented; export the adapter with explicit target_modules"),
    "layer_replication": (None, "layer_replication is not implemented"),
    "exclude_modules": (None, "exclude_modules is not implemented; use explicit target_modules"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters) is not implemented"),
    "trainable_token_indices": (None, "trainable_token_indices is not implemented"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not implemented"),
    "use_qalora": (False, "QA-LoRA is not implemented"),
    "use_bdlora": (None, "BD-LoRA is not implemented"),
    "arrow_config": (None, "Arrow routing is not implemented"),
    "megatron_config": (None, "Megatron parallel layers are not supported"),
}


def _import_lora(config, tensors, model, folder) -> tuple[core.Method, dict, str]:
    problems = []
    for field, (fine, why) in _REFUSED_LORA_FIELDS.items():
        value = config.get(field, fine)
        default = value in (None, False, [], {}, "") if fine in (None, False) else value == fine
        if not default:
            problems.append(f"{field}={value!r}: {why}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: trained biases (bias != 'none') are not "
                        "implemented")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            problems.append(f"{field}={config[field]!r}: per-module ranks/alphas are not implemented "
                            "(peftjax LoRA has one rank and alpha for all targets)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0].lower() in ("pissa", "olora", "corda", "loftq"):
        problems.append(f"init_lora_weights={init!r}: this init rewrites the base weights, which "
                        "the adapter alone does not carry")
    method_name = "dora" if config.get("use_dora") else "lora"
    if method_name not in core.registered():
        problems.append("use_dora=True needs peftjax.methods.dora, which is not available")
    if problems:
        raise AdapterError(f"{folder}: cannot import this LoRA adapter:\n  " + "\n  ".join(problems))

    prefix = "base_model.model."
    extra = LOW_RANK_EXTRA[method_name]
    suffixes = ("lora_A.weight", "lora_B.weight", *extra)
    in_file = _strip_prefix(tensors, prefix)
    lora_keys = {k: full for k, full in in_file.items() if k.endswith(tuple("." + s for s in suffixes))}
    file_modules = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                           for k in lora_keys})
    to_site = _module_map(model, file_modules)

    sites = core.Sites.discover(model)
    r = config.get("r", 8)
    kwargs = dict(rank=int(r), alpha=float(config.get("lora_alpha", 8)),
                  dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                  use_rslora=bool(config.get("use_rslora", False)),
                  targets=_peft_targets_regex(config.get("target_modules"), sites),
                  init="gaussian" if init == "gaussian" else "default")
    try:
        method = core.create(method_name, model, kwargs, sites=sites)
    except ValueError as e:
        raise AdapterError(f"{folder}: target_modules={config.get('target_modules')!r} does not fit "
                           f"the {model.family.name} model: {e}") from None

    # fan_in_fan_out only tells PEFT a target is a Conv1D (weight (in, out)); PEFT corrects it per
    # layer type, and lora_A / lora_B are stored with the nn.Linear shapes either way. A value
    # that contradicts the targets is refused rather than silently reinterpreted.
    fifo = bool(config.get("fan_in_fan_out", False))
    if fifo and not _conv1d_targets(model, method.targets):
        raise AdapterError(f"{folder}: fan_in_fan_out=True is for Conv1D (GPT-2) layers, but the "
                           f"targets of the {model.family.name} model are nn.Linear layers")
    added, missing, misshaped = {}, [], []
    site_to_file = {s: m for m, s in to_site.items()}
    for site in method.targets:
        info = sites.linear[site]
        module = site_to_file.get(site, site)
        want = {"lora_A.weight": ((r, info["in_features"]), "lora_A", True),
                "lora_B.weight": ((info["out_features"], r), "lora_B", True)}
        want.update({k: ((info["out_features"],), v, False) for k, v in extra.items()})
        for suffix, (shape, ours, transpose) in want.items():
            key = f"{module}.{suffix}"
            if key not in lora_keys:
                missing.append(prefix + key)
                continue
            array = tensors.pop(lora_keys.pop(key))  # consumed: the head import sees the rest
            if tuple(array.shape) != shape:
                misshaped.append(f"{prefix}{key}: adapter {tuple(array.shape)}, model expects {shape}")
                continue
            added[f"{site}.{ours}"] = jax.numpy.asarray(array.T if transpose else array)
    unexpected = sorted(prefix + k for k in lora_keys)
    if missing or misshaped or unexpected:
        lines = []
        if missing:
            lines.append(_listing("missing keys (modules that target_modules selects)", missing))
        if unexpected:
            lines.append(_listing("unexpected keys (modules not selected or not adaptable)", unexpected))
        if misshaped:
            lines.append(_listing("mis-shaped keys", misshaped))
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  "
                           + "\n  ".join(lines))
    return method, added, prefix


def _import_prompt(config, tensors, model, folder) -> tuple[core.Method, dict, str]:
    problems = []
    if config.get("num_transformer_submodules", 1) not in (1, None):
        problems.append(f"num_transformer_submodules={config['num_transformer_submodules']}: "
                        "encoder-decoder prompts are not supported")
    if "prompt_embeddings" not in tensors:
        problems.append("missing key: prompt_embeddings")
    if problems:
        raise AdapterError(f"{folder}: cannot import this prompt-tuning adapter:\n  " + "\n  ".join(problems))
    prompt = tensors.pop("prompt_embeddings")
    n = int(config.get("num_virtual_tokens", prompt.shape[0]))
    method = core.create("prompt_tuning", model, {"num_virtual_tokens": n})
    want = (n, method.hidden)
    if tuple(prompt.shape) != want:
        raise AdapterError(f"{folder} does not fit the {model.family.name} model:\n  "
                           f"mis-shaped keys (1): prompt_embeddings: adapter {tuple(prompt.shape)}, "
                           f"model expects {want} (num_virtual_tokens, hidden size)")
    return method, {f"{method.site}.prompt_embeddings": jax.numpy.asarray(prompt)}, "base_model."


def _import_head(tensors, model, prefix, folder, require_head) -> tuple[dict, list[str]]:
    """Head params from the remaining tensors; returns (head, unexpected keys)."""
    head, missing, misshaped = {}, [], []
    remaining = dict(tensors)
    for path, spec in _head_params(model).items():
        name, transpose = hf_io.hf_name(path)
        key = prefix + name
        if key not in remaining:
            missing.append(key)
            continue
        array = remaining.pop(key)
        array = array.T if transpose else array
        if tuple(array.shape) != tuple(spec.shape):
            misshaped.append(f"{key}: adapter {tuple(array.T.shape if transpose else array.shape)}, "
                             f"model expects {tuple(spec.shape[::-1]) if transpose else tuple(spec.shape)}")
            continue
        head[path] = jax.numpy.asarray(array)
    if missing and not require_head and len(missing) == len(_head_params(model)):
        head, missing = {}, []
    if missing or misshaped:
        lines = []
        if missing:
            lines.append(_listing("missing head keys (modules_to_save)", missing)
                         + " — pass require_head=False to supply the head yourself")
        if misshaped:
            lines.append(_listing("mis-shaped head keys", misshaped))
        raise AdapterError(f"{folder} does not fit the {model.family.name} model "
                           f"(head {model.head!r}, num_labels={model.num_labels}):\n  " + "\n  ".join(lines))
    return head, sorted(remaining)

"""peftjax's own adapter files: what a method trained, and nothing of the frozen base.

A folder with two files, each written atomically (``peftjax.files.atomic_write``):

* ``adapter.safetensors`` — the trainable tree and the method state, flat:
  ``trainable.base.<param path>``, ``trainable.added.<name>``, ``trainable.head.<param path>``,
  ``state.<name>``. For the sparse selection methods (FishMask, Child-tuning_D) that is the k
  selected values and their int32 indices, so the file scales with k, not with the model. A
  method that rewrites the base (``Method.rewrites_base``: PiSSA's residual W0 − s·A₀B₀) also
  stores its *initial* added params as ``initial.<name>``, from which the frozen base it trained
  against is rebuilt on load.
* ``adapter_config.json`` — the method's name and resolved config, the model's Hugging Face
  config (to refuse a mismatched base on load), and any extra fields the caller adds.

Why not only the orbax checkpoints: those hold the optimizer state too and are a training
artifact; this file is the result a user shares, loads beside the pretrained base
(``load_adapter``) or converts (``peftjax.interop`` for the Hugging Face PEFT format). Safetensors
never unpickles.

Loading needs no training data: the method is rebuilt from its config (a Fisher mask is not
recomputed; its indices are in the file) and the frozen params are the base minus what the
method trains (``Method.partition``). Every tensor's shape is checked against what that method
builds on this model before anything is returned: an edited config (rank 8 → 4 over rank-8
tensors) is refused with the list of mismatches instead of silently changing the scaling.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from peftjax.files import atomic_write, write_json_atomic
from peftjax.methods import core

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
_TREES = ("base", "added", "head")


def save_adapter(folder: str, method: core.Method, trainable: Mapping, state: Mapping, *,
                 initial_added: Mapping | None = None, extra: Mapping[str, Any] | None = None) -> int:
    """Writes the adapter; returns the size of ``adapter.safetensors`` in bytes.

    The method is saved in its ``for_saving`` form (prefix tuning: its training-time MLP folded
    into the plain prefixes it computes). ``initial_added`` (the added params at setup) is
    required for a method that rewrites the base, and ignored otherwise.
    """
    from safetensors.numpy import save_file

    if method.rewrites_base and initial_added is None:
        raise ValueError(f"{method.name} rewrites the base params ({_config_text(method)}): pass "
                         "initial_added (its added params at setup) so that the base it trained "
                         "against can be rebuilt on load")
    method, trainable = method.for_saving(trainable)
    tensors = {}
    for tree in _TREES:
        for path, value in (trainable.get(tree) or {}).items():
            tensors[f"trainable.{tree}.{path}"] = np.ascontiguousarray(np.asarray(value))
    for name, value in state.items():
        tensors[f"state.{name}"] = np.ascontiguousarray(np.asarray(value))
    if method.rewrites_base:
        for name, value in initial_added.items():
            tensors[f"initial.{name}"] = np.ascontiguousarray(np.asarray(value))
    config = {"method": method.name, "method_config": _jsonable(dataclasses.asdict(method.config)),
              "model_config": method.model.hf_config.to_dict(), **dict(extra or {})}
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, WEIGHTS)
    atomic_write(weights, lambda p: save_file(tensors, p))
    write_json_atomic(os.path.join(folder, CONFIG), config, indent=2, sort_keys=True)
    return os.path.getsize(weights)


def load_adapter(folder: str, model, base: Mapping | None = None
                 ) -> tuple[core.Method, dict, dict, dict | None]:
    """``(method, trainable, state, frozen)`` from a folder written by ``save_adapter``.

    ``frozen`` is computed from the flat ``base`` params when given (else ``None``). Raises
    ``ValueError`` when the folder was written for another model or its tensors do not have the
    shapes its method config builds.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    cfg_path, weights = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    missing = [p for p in (cfg_path, weights) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"not a peftjax adapter folder: missing {', '.join(missing)}")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    saved_model = config.get("model_config", {})
    mine = model.hf_config.to_dict()
    differ = sorted(k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                "num_attention_heads", "num_labels")
                    if k in saved_model and saved_model.get(k) != mine.get(k))
    if differ:
        raise ValueError(f"adapter in {folder} was trained on another model: "
                         + ", ".join(f"{k} {saved_model[k]!r} != {mine.get(k)!r}" for k in differ))
    method = core.create(config["method"], model, config["method_config"])
    try:
        tensors = load_file(weights)
    except SafetensorError as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e})") from None
    trainable: dict = {t: {} for t in _TREES}
    state: dict = {}
    initial: dict = {}
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "trainable":
            tree, path = rest.split(".", 1)
            trainable[tree][path] = value
        elif kind == "initial":
            initial[rest] = value
        else:
            state[rest] = value
    check_shapes(method, trainable, state, source=weights)
    if method.rewrites_base and not initial:
        raise ValueError(f"{weights} holds no initial.* tensors, which {method.name} "
                         f"({_config_text(method)}) needs to rebuild the base it trained against "
                         "(it was saved by an older peftjax); merge or re-export it from its run")
    frozen = None
    if base is not None:
        base = dict(base)
        if method.rewrites_base:
            base = method.transform_base(base, initial)
        frozen = method.partition(base)[2]
    return method, trainable, state, frozen


def _expected_shapes(method: core.Method) -> tuple[dict, dict] | None:
    """``(trainable shapes by tree, state shapes)`` that ``method`` builds on its model, from
    shapes alone; None when they depend on data (Fisher selections) or a tokenizer."""
    from flax import traverse_util

    abstract = traverse_util.flatten_dict(method.model.abstract_params(), sep=".")
    try:
        peft = jax.eval_shape(lambda b: method.setup(jax.random.PRNGKey(0), b), abstract)
    except Exception:  # noqa: BLE001 — data-driven or tokenizer-driven init: checked in part below
        return None
    shape = lambda tree: {k: tuple(v.shape) for k, v in tree.items()}
    return {t: shape(peft.trainable[t]) for t in _TREES}, shape(peft.state)


def check_shapes(method: core.Method, trainable: Mapping, state: Mapping, *, source: str) -> None:
    """Refuses (listing every key) tensors whose names or shapes differ from what ``method``
    builds on its model. For data-driven selections the per-param values are checked against
    their stored indices and the model's params instead."""
    from flax import traverse_util

    problems: list[str] = []
    expected = _expected_shapes(method)
    if expected is not None:
        want_trees, want_state = expected
        groups = [(f"trainable.{t}", trainable.get(t, {}), want_trees[t]) for t in _TREES]
        groups.append(("state", state, want_state))
        for prefix, got, want in groups:
            for k in sorted(set(want) - set(got)):
                problems.append(f"{prefix}.{k}: missing (expected shape {want[k]})")
            for k in sorted(set(got) - set(want)):
                problems.append(f"{prefix}.{k}: not a param of this method")
            for k in sorted(set(got) & set(want)):
                if tuple(np.shape(got[k])) != want[k]:
                    problems.append(f"{prefix}.{k}: shape {tuple(np.shape(got[k]))}, expected {want[k]}")
    else:
        params = {k: tuple(v.shape) for k, v in
                  traverse_util.flatten_dict(method.model.abstract_params(), sep=".").items()}
        for tree in ("base", "head"):
            for k, v in (trainable.get(tree) or {}).items():
                shp = tuple(np.shape(v))
                if k not in params:
                    problems.append(f"trainable.{tree}.{k}: not a param of this model")
                elif shp != params[k] and not (len(shp) == 1 and k + ".indices" in state
                                                and np.shape(state[k + ".indices"]) == shp):
                    problems.append(f"trainable.{tree}.{k}: shape {shp}, expected {params[k]} "
                                    "or a vector as long as its stored indices")
    if problems:
        raise ValueError(f"{source} does not fit method {method.name} ({_config_text(method)}) on "
                         f"this model; {len(problems)} mismatch(es):\n  " + "\n  ".join(problems[:40])
                         + ("\n  ..." if len(problems) > 40 else ""))


def _config_text(method: core.Method) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(method.config).items())


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value

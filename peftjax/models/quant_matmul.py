"""A matmul that reads a quantized kernel's packed codes directly: the dequantization fused into
the GEMM, as a Pallas (Triton) GPU kernel.

Why a kernel of our own: XLA:GPU does not fuse peftjax's dequantization into its GEMMs (jax
0.10.2, compiled for an H100: ``experiments/quant_minilm/gpu_fusion.py``). Its Triton GEMM fusion
takes a one-operand prologue only (a convert, a constant scale); the per-block absmax product and
NF4's 16-entry lookup are written out first as a float kernel — for a 4096 × 4096 layer 32 MiB of
bf16 plus the unpacked codes, read back by the GEMM. QLoRA's point is that the base is read in 4
bits (Dettmers et al. 2023, §3); bitsandbytes' ``gemv_4bit`` and the later fused kernels (Marlin,
Frantar et al. 2024) read the packed codes inside the matmul. Here each program of the kernel
loads one tile of packed codes and its absmaxes, dequantizes it in registers and multiplies:

    y[m, n] = Σ_b Σ_{k in block b} x[m, k] · cast(NF4_CODE[q[k, n]] · absmax[b, n])      (NF4)
    y[m, n] = Σ_k x[m, k] · cast((q[k, n] · scale[n]) · (1/127))                          (int8)

with every weight formed exactly as ``quant.dequantize`` forms it (the float32 product rounded
once to the compute dtype, bitsandbytes' order), so the two paths differ only in the float
summation order of the matmul (f32 accumulation both). NF4's lookup is a four-level select tree
on the code's bits (what bitsandbytes' ``dDequantizeNF4`` does on a GPU: a gather is no Triton
operation). Double quantization's absmaxes (one per 64 weights) are decoded first by XLA
(``quant.absmax_of``: 1/32 of the bf16 kernel's bytes), as bitsandbytes decodes them in a
separate kernel before its 4-bit one.

Layout (``quant``): NF4 ``data`` ``(in_p / 2, out)``, rows 2i (high nibble) and 2i + 1 (low) of
block-aligned input features; so a K step of one block (64 inputs) multiplies the even inputs by
the high nibbles and the odd ones by the low nibbles — two dots of depth 32, no interleaving of
codes in registers (strided loads of ``x`` do it instead). The backward's ``dx = dy · Wᵀ``
(the base is frozen: no ``dW``) is the same tile of codes used transposed, its even and odd
outputs stored with stride 2.

The trade: each program dequantizes its tile of codes for its own 64 rows of ``x``, so a weight
is decoded once per 64 rows (8 times for the memory table's 512-token batch), each time a
~20-operation select chain on the ALUs, where XLA's path decodes it once and pays a write and a
read of the bf16 kernel instead (bitsandbytes' training path, ``MatMul4Bit``, is the latter: it
dequantizes, then calls cuBLAS; its fused ``gemv_4bit`` serves one-token inference). The kernel
saves the memory; whether it is also faster at a given batch is for
``experiments/quant_minilm/gpu_bench.py`` on a card to say (not measured yet).

Which path a layer takes: ``QUANT_MATMUL`` (like ``moe.GROUPED_MATMUL``): ``auto`` uses the fused
kernel when the program is compiled for a GPU (``gpu_target.compile_platform``, a deviceless
compile included) and XLA's dequantize-then-dot elsewhere (the CPU has no Triton); ``fused`` /
``xla`` force one; ``interpret`` runs the fused kernel through Pallas' interpreter (any backend:
how the tests check its values on a CPU). Shapes the kernel does not tile (an int8 kernel whose
``in`` is not a multiple of 16, an ``out`` not a multiple of 16) take XLA's path. So does
``auto`` in a program partitioned over several devices (``partitioned``, set by
``parallel.shard``): a Pallas call has no sharding rule, so XLA's partitioner would gather every
sharded quantized matrix onto each device for it. A run sets its path with
``--config.model.quant_matmul`` (``train.quantize.traced``, which traces its steps ``using`` it).

A mixture of experts' quantized stack (``moe.quantized_grouped_matmul``) takes the same kernels:
its rows, sorted by expert, come in tiles of one expert each, and each program reads its
expert's codes (an expert stack's codes are its experts' rows end to end).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from peftjax.gpu_target import compile_platform
from peftjax.models import quant

MODES = ("auto", "xla", "fused", "interpret")
QUANT_MATMUL = "auto"

GPU_PLATFORMS = ("cuda", "gpu")
# 8 warps: with 4, ptxas spills registers in the NF4 forward kernel on an H100 (255 registers)
NUM_WARPS = 8
NUM_STAGES = 3
# Columns of dy per step of the backward: 128 spills registers on an RTX 4090 (sm_89, ptxas).
BACKWARD_TILE_N = (64, 32, 16)

_PARTITIONED: contextvars.ContextVar[bool] = contextvars.ContextVar("peftjax_quant_partitioned",
                                                                    default=False)


@contextlib.contextmanager
def partitioned() -> Iterator[None]:
    """Trace for a program partitioned over several devices (``auto`` then takes XLA's path)."""
    token = _PARTITIONED.set(True)
    try:
        yield
    finally:
        _PARTITIONED.reset(token)


_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftjax_quant_matmul",
                                                                  default=None)


@contextlib.contextmanager
def using(mode: str) -> Iterator[None]:
    """``mode`` instead of ``QUANT_MATMUL`` while tracing inside the block (a run's
    ``model.quant_matmul``; XLA's path for a FLOP count on the CPU of a program compiled for a
    GPU). A context variable: threads tracing side by side keep their own."""
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def mode_for(q: quant.QuantizedTensor) -> str:
    """``"xla"`` or ``"fused"`` / ``"interpret"`` for a matmul on ``q`` (see module docstring)."""
    mode = _MODE.get() or QUANT_MATMUL
    if mode not in MODES:
        raise ValueError(f"quantized matmul mode {mode!r} is invalid; valid: {', '.join(MODES)}")
    if mode == "auto":
        on_gpu = compile_platform() in GPU_PLATFORMS
        mode = "fused" if on_gpu and not _PARTITIONED.get() else "xla"
    if mode != "xla" and not tiles(q):
        return "xla"
    return mode


def _largest_dividing(n: int, options: tuple[int, ...]) -> int | None:
    return next((b for b in options if n % b == 0), None)


def tiles(q: quant.QuantizedTensor) -> bool:
    """Whether the fused kernel handles ``q``: a 2-D kernel or an expert stack whose ``out``
    (and int8's ``in``) splits into tiles of at least 16, Triton's smallest dot (NF4: half a
    block, the depth of each of its dots, at least 16)."""
    if len(q.shape) not in (2, 3):
        return False
    n_in, n_out = q.shape[-2:]
    if _largest_dividing(n_out, (128, 64, 32, 16)) is None:
        return False
    if q.kind == "int8":
        return _largest_dividing(n_in, (64, 32, 16)) is not None
    return q.kind == "nf4" and q.block_size % 32 == 0 and q.block_size <= 128


# --------------------------------------------------------------------------------------------
# In-kernel dequantization (values bit for bit those of quant.dequantize).


def _nf4_value(codes: jax.Array) -> jax.Array:
    """``NF4_CODE[codes]`` in float32 for 4-bit integer ``codes``: a select tree on the bits
    (bit 0 picks within pairs of neighbouring codes, bit 3 between the halves), every leaf one
    of the 16 float32 constants."""
    level = [jnp.float32(v) for v in quant.NF4_CODE]
    for bit in range(4):
        on = (codes & (1 << bit)) != 0
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _nf4_tiles(data: jax.Array, absmax: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The even-row (high nibble) and odd-row (low nibble) float tiles of packed ``data``
    ``(rows, n)`` with their block's ``absmax`` ``(1, n)``."""
    codes = data.astype(jnp.int32)
    high = (_nf4_value(codes >> 4) * absmax).astype(dtype)
    low = (_nf4_value(codes & 15) * absmax).astype(dtype)
    return high, low


def _int8_tile(data: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    return ((data.astype(jnp.float32) * scale) * jnp.float32(quant.INV_127)).astype(dtype)


def _dot(a: jax.Array, b: jax.Array, transpose_b: bool = False) -> jax.Array:
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------
# Kernels. Each program takes one tile of rows (``x`` or ``dy``) and the index of the expert its
# rows belong to (``expert_ref``: 0 for a 2-D kernel; an expert stack's codes are its experts'
# rows end to end, so the expert picks a row offset into the codes and scales).


def _nf4_forward_kernel(expert_ref, x_ref, data_ref, absmax_ref, y_ref, *, block: int, blocks: int):
    half = block // 2
    first = expert_ref[0] * blocks                  # the expert's first block of 64 inputs

    def step(b, acc):
        high, low = _nf4_tiles(data_ref[pl.ds((first + b) * half, half), :],
                               absmax_ref[pl.ds(first + b, 1), :], x_ref.dtype)
        even = x_ref[:, pl.ds(b * block, half, stride=2)]
        odd = x_ref[:, pl.ds(b * block + 1, half, stride=2)]
        return acc + _dot(even, high) + _dot(odd, low)

    acc = jnp.zeros(y_ref.shape, jnp.float32)
    y_ref[...] = jax.lax.fori_loop(0, blocks, step, acc).astype(y_ref.dtype)


def _nf4_backward_kernel(expert_ref, dy_ref, data_ref, absmax_ref, dx_ref, *, block: int,
                         blocks: int, tile_n: int):
    """One block of 64 inputs: ``dx[:, even] = dy · highᵀ``, ``dx[:, odd] = dy · lowᵀ``."""
    half = block // 2
    row = expert_ref[0] * blocks + pl.program_id(1)

    def step(j, accs):
        cols = pl.ds(j * tile_n, tile_n)
        high, low = _nf4_tiles(data_ref[pl.ds(row * half, half), cols],
                               absmax_ref[pl.ds(row, 1), cols], dy_ref.dtype)
        dy = dy_ref[:, cols]
        return accs[0] + _dot(dy, high, True), accs[1] + _dot(dy, low, True)

    zeros = jnp.zeros((dx_ref.shape[0], half), jnp.float32)
    even, odd = jax.lax.fori_loop(0, dy_ref.shape[1] // tile_n, step, (zeros, zeros))
    dx_ref[:, pl.ds(0, half, stride=2)] = even.astype(dx_ref.dtype)
    dx_ref[:, pl.ds(1, half, stride=2)] = odd.astype(dx_ref.dtype)


def _int8_forward_kernel(expert_ref, x_ref, data_ref, scale_ref, y_ref, *, n_in: int, tile_k: int):
    e = expert_ref[0]
    scale = scale_ref[pl.ds(e, 1), :]

    def step(k, acc):
        w = _int8_tile(data_ref[pl.ds(e * n_in + k * tile_k, tile_k), :], scale, x_ref.dtype)
        return acc + _dot(x_ref[:, pl.ds(k * tile_k, tile_k)], w)

    acc = jnp.zeros(y_ref.shape, jnp.float32)
    y_ref[...] = jax.lax.fori_loop(0, n_in // tile_k, step, acc).astype(y_ref.dtype)


def _int8_backward_kernel(expert_ref, dy_ref, data_ref, scale_ref, dx_ref, *, n_in: int,
                          tile_n: int):
    e = expert_ref[0]
    rows = pl.ds(e * n_in + pl.program_id(1) * dx_ref.shape[1], dx_ref.shape[1])

    def step(j, acc):
        cols = pl.ds(j * tile_n, tile_n)
        w = _int8_tile(data_ref[rows, cols], scale_ref[pl.ds(e, 1), cols], dy_ref.dtype)
        return acc + _dot(dy_ref[:, cols], w, True)

    acc = jnp.zeros(dx_ref.shape, jnp.float32)
    dx_ref[...] = jax.lax.fori_loop(0, dy_ref.shape[1] // tile_n, step, acc).astype(dx_ref.dtype)


# --------------------------------------------------------------------------------------------
# Launchers.

def row_tile(m: int) -> int:
    """Rows per program: 64, or the smallest power of two ≥ 16 holding ``m`` (few tokens)."""
    return 64 if m >= 64 else max(16, 1 << (m - 1).bit_length())


def _pad_rows(x: jax.Array, tile: int) -> jax.Array:
    return jnp.pad(x, ((0, -x.shape[0] % tile), (0, 0)))


def _call(kernel, out_shape, grid, in_specs, out_spec, interpret, *args):
    from jax.experimental.pallas import triton as plgpu

    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret)(*args)


def scales_of(q: quant.QuantizedTensor, trigger: jax.Array) -> jax.Array:
    """Float32 scales as the kernels read them: NF4's absmaxes ``(E·in_p / block, out)`` (double
    quantization decoded), int8's per-output absmaxes ``(E, out)`` (E = 1 for a 2-D kernel).
    Made dependent on ``trigger`` (``quant.after``) so that XLA decodes each layer's absmaxes
    where its matmul runs, not all layers' at the start of the step."""
    q = dataclasses.replace(q, scale=quant.after(q.scale, trigger))
    if q.kind == "int8":
        return q.scale.astype(jnp.float32).reshape(-1, q.shape[-1])
    return quant.absmax_of(q)


def _codes(q: quant.QuantizedTensor) -> jax.Array:
    """The codes as 2-D rows: NF4's already are; an int8 stack's experts end to end."""
    return q.data.reshape(-1, q.shape[-1])


def _tiling(rows: int, experts: jax.Array | None, tile: int | None):
    """(rows per program, each program's expert): one expert for a 2-D kernel's row tiles."""
    if experts is None:
        tile = row_tile(rows) if tile is None else tile
        return tile, jnp.zeros((-(-rows // tile),), jnp.int32)
    return tile, experts.astype(jnp.int32)


def forward(x: jax.Array, q: quant.QuantizedTensor, scales: jax.Array, *,
            experts: jax.Array | None = None, tile: int | None = None,
            interpret: bool = False) -> jax.Array:
    """``x @ dequantize(q, x.dtype)`` for 2-D ``x`` ``(M, in)``, by the fused kernel. For an
    expert stack ``q`` ``(E, in, out)``, ``x``'s rows come in tiles of ``tile`` rows, tile ``t``
    multiplied by expert ``experts[t]`` (``moe``'s grouped layout)."""
    n_in, n_out = q.shape[-2:]
    bm, expert_of = _tiling(x.shape[0], experts, tile)
    bn = _largest_dividing(n_out, (128, 64, 32, 16))
    n_experts = q.shape[0] if len(q.shape) == 3 else 1
    if q.kind == "nf4":
        blocks = scales.shape[0] // n_experts
        x = jnp.pad(x, ((0, 0), (0, blocks * q.block_size - n_in)))   # the blocks' zero padding
        kernel = functools.partial(_nf4_forward_kernel, block=q.block_size, blocks=blocks)
    else:
        kernel = functools.partial(_int8_forward_kernel, n_in=n_in,
                                   tile_k=_largest_dividing(n_in, (64, 32, 16)))
    xp = _pad_rows(x, bm)
    rows, k = xp.shape
    codes = _codes(q)
    y = _call(kernel, jax.ShapeDtypeStruct((rows, n_out), x.dtype), (rows // bm, n_out // bn),
              [pl.BlockSpec((1,), lambda i, j: (i,)),
               pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
               pl.BlockSpec((codes.shape[0], bn), lambda i, j: (0, j)),
               pl.BlockSpec((scales.shape[0], bn), lambda i, j: (0, j))],
              pl.BlockSpec((bm, bn), lambda i, j: (i, j)), interpret,
              expert_of, xp, codes, scales)
    return y[:x.shape[0]]


def backward(dy: jax.Array, q: quant.QuantizedTensor, scales: jax.Array, *,
             experts: jax.Array | None = None, tile: int | None = None,
             interpret: bool = False) -> jax.Array:
    """``dy @ dequantize(q, dy.dtype).T`` for 2-D ``dy`` ``(M, out)``, by the fused kernel (an
    expert stack's tiles as in ``forward``)."""
    n_in, n_out = q.shape[-2:]
    bm, expert_of = _tiling(dy.shape[0], experts, tile)
    bn = _largest_dividing(n_out, BACKWARD_TILE_N)
    n_experts = q.shape[0] if len(q.shape) == 3 else 1
    dyp = _pad_rows(dy, bm)
    rows = dyp.shape[0]
    if q.kind == "nf4":
        blocks = scales.shape[0] // n_experts
        k_tile, k = q.block_size, blocks * q.block_size
        kernel = functools.partial(_nf4_backward_kernel, block=k_tile, blocks=blocks, tile_n=bn)
    else:
        k_tile, k = _largest_dividing(n_in, (64, 32, 16)), n_in
        kernel = functools.partial(_int8_backward_kernel, n_in=n_in, tile_n=bn)
    codes = _codes(q)
    dx = _call(kernel, jax.ShapeDtypeStruct((rows, k), dy.dtype), (rows // bm, k // k_tile),
               [pl.BlockSpec((1,), lambda i, b: (i,)),
                pl.BlockSpec((bm, n_out), lambda i, b: (i, 0)),
                pl.BlockSpec(codes.shape, lambda i, b: (0, 0)),
                pl.BlockSpec(scales.shape, lambda i, b: (0, 0))],
               pl.BlockSpec((bm, k_tile), lambda i, b: (i, b)), interpret,
               expert_of, dyp, codes, scales)
    return dx[:dy.shape[0], :n_in]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, q: quant.QuantizedTensor, interpret: bool = False) -> jax.Array:
    """``x @ dequantize(q, x.dtype)`` for ``x`` ``(..., in)`` by the fused kernels, forward and
    backward (``q`` frozen: zero cotangents, as ``layers.quantized_matmul``)."""
    return _matmul_fwd(x, q, interpret)[0]


def _matmul_fwd(x, q, interpret):
    y = forward(x.reshape(-1, x.shape[-1]), q, scales_of(q, x), interpret=interpret)
    return y.reshape(*x.shape[:-1], q.shape[1]), q


def _matmul_bwd(interpret, q, dy):
    dx = backward(dy.reshape(-1, dy.shape[-1]), q, scales_of(q, dy), interpret=interpret)
    return dx.reshape(*dy.shape[:-1], q.shape[0]), quant.zero_cotangents(q)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def reference(x: jax.Array, q: quant.QuantizedTensor) -> jax.Array:
    """XLA's path, for comparison: dequantize, then dot (f32 accumulation, x's dtype out)."""
    w = quant.dequantize(q, x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


"""NF4 (QLoRA) and int8 storage of frozen kernels: numerics against bitsandbytes, packing,
double quantization, the quantized matmul's gradient, and the safetensors form.

bitsandbytes is a test peer like torch and peft (importorskip). Its 4-bit quantization on the
CPU is its pure-torch reference kernel (``backends/default``: bucketize over the float32 code
midpoints); its 8-bit blockwise quantization (the second level of double quantization) has a
native CPU kernel whose binary search is approximate (it picks the farther of two codes in ~0.2%
of entries near a midpoint), so the double-quantization check uses bitsandbytes' reference
kernel, reached by redispatching the op to ``CompositeExplicitAutograd`` — the kernel every
backend without a native one runs, and the exact nearest-code rule of the paper.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.models import quant
from peftjax.models.layers import quantized_matmul

# The 16 NF4 values as printed in QLoRA's Appendix E (Dettmers et al. 2023).
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def kernel(n_in: int, n_out: int, seed: int = 0, std: float = 0.05) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n_in, n_out)) * std
    return w.astype(np.float32)


@pytest.fixture(scope="module")
def bnb():
    pytest.importorskip("torch")
    return pytest.importorskip("bitsandbytes.functional")


def test_nf4_code_is_the_papers_and_bitsandbytes(bnb):
    np.testing.assert_array_equal(quant.NF4_CODE, np.array(PAPER_NF4, np.float32))
    np.testing.assert_array_equal(quant.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(quant.DYNAMIC_CODE, bnb.create_dynamic_map().numpy())


@pytest.mark.parametrize("shape", [(128, 96), (256, 40)])
def test_nf4_bit_for_bit_with_bitsandbytes(bnb, shape):
    import torch

    w = kernel(*shape)
    packed, state = bnb.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64,
                                      compress_statistics=False, quant_type="nf4")
    q = quant.quantize(jnp.asarray(w), "nf4", double_quant=False)
    # bitsandbytes flattens torch's (out, in) weight; ours is flax's (in, out) kernel: transpose
    np.testing.assert_array_equal(np.asarray(q.data).T.reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scale).T.reshape(-1), state.absmax.numpy())
    for ours, theirs in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
        state.dtype = theirs
        ref = bnb.dequantize_4bit(packed, state, quant_type="nf4").float().numpy()
        got = np.asarray(quant.dequantize(q, ours).astype(jnp.float32)).T
        np.testing.assert_array_equal(got, ref)


def test_double_quant_bit_for_bit_with_bitsandbytes_reference(bnb):
    import torch

    w = kernel(640, 96, seed=1)                   # 10 x 96 = 960 absmaxes: 4 blocks of 256
    packed, state = bnb.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64,
                                      compress_statistics=False, quant_type="nf4")
    absmax = state.absmax
    offset = absmax.mean()
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    reference = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    code = bnb.create_dynamic_map()
    q8, absmax2 = op.redispatch(reference, absmax - offset, code, 256)

    q = quant.quantize(jnp.asarray(w), "nf4", double_quant=True)
    # the mean is summed in a fixed order here; torch's may differ in the last bit
    np.testing.assert_allclose(float(q.offset), float(offset), rtol=2 ** -22)
    codes, a2, _ = quant.double_quantize(quant.quantize(jnp.asarray(w), "nf4", False).scale,
                                         offset.numpy())
    np.testing.assert_array_equal(np.asarray(codes).T.reshape(-1), q8.numpy())
    np.testing.assert_array_equal(np.asarray(a2), absmax2.numpy())
    # decoding: code[q8] * absmax2 + offset, then the 4-bit dequantization (bitsandbytes' own)
    decoded = (bnb.dequantize_blockwise(q8, absmax=absmax2, code=code, blocksize=256)
               + offset).numpy()
    dq = quant.QuantizedTensor(q.data, codes, a2, jnp.asarray(offset.numpy()), shape=q.shape)
    np.testing.assert_array_equal(np.asarray(quant.absmax_of(dq)).T.reshape(-1), decoded)
    state.absmax = torch.from_numpy(decoded)
    ref = bnb.dequantize_4bit(packed, state, quant_type="nf4").numpy()
    np.testing.assert_array_equal(np.asarray(quant.dequantize(dq)).T, ref)
    # stored: 4 bits per weight + 8 bits per 64 + 32 bits per 64 x 256 (+ the offset)
    assert q.scale.dtype == jnp.uint8 and q.scale2.shape == (4,)
    assert q.nbytes == w.size // 2 + w.size // 64 + 4 * 4 + 4


def test_int8_bit_for_bit_with_bitsandbytes(bnb):
    import torch

    w = kernel(96, 80, seed=2)
    cb, stats, _ = bnb.int8_vectorwise_quant(torch.from_numpy(w.T.copy()))
    q = quant.quantize(jnp.asarray(w), "int8")
    assert q.data.dtype == jnp.int8 and q.scale.shape == (80,)   # one absmax per output
    np.testing.assert_array_equal(np.asarray(q.data).T, cb.numpy())
    np.testing.assert_array_equal(np.asarray(q.scale), stats.numpy())
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)).T,
                                  bnb.int8_vectorwise_dequant(cb, stats).numpy())


def test_two_codes_per_byte_high_nibble_first():
    w = kernel(64, 3)
    q = quant.quantize(jnp.asarray(w), "nf4", double_quant=False)
    assert q.data.shape == (32, 3) and q.data.dtype == jnp.uint8
    idx = np.asarray(quant.unpack_nf4(q.data))
    assert idx.shape == (64, 3) and idx.max() <= 15
    data = np.asarray(q.data)
    np.testing.assert_array_equal(data >> 4, idx[0::2])
    np.testing.assert_array_equal(data & 15, idx[1::2])
    # the indices are the nearest codes of w / absmax (exact nearest: no value near a midpoint)
    scaled = w / np.abs(w).max(axis=0)
    nearest = np.abs(scaled[..., None] - quant.NF4_CODE).argmin(-1)
    np.testing.assert_array_equal(idx, nearest)


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_round_trip_error_is_bounded(kind, double_quant):
    w = kernel(200, 24, seed=3)                     # 200: the last block is zero-padded
    q = quant.quantize(jnp.asarray(w), kind, double_quant)
    back = np.asarray(quant.dequantize(q))
    assert back.shape == w.shape and back.dtype == np.float32
    if kind == "int8":
        bound = np.abs(w).max(axis=0, keepdims=True) / 254 * (1 + 1e-6)
    else:  # half the widest gap of the code, times the block's absmax (+ the absmax's own error)
        gap = np.diff(quant.NF4_CODE).max() / 2
        pad = np.pad(np.abs(w), ((0, 56), (0, 0))).reshape(4, 64, 24).max(1)
        bound = np.repeat(pad, 64, axis=0)[:200] * gap * (1.02 if double_quant else 1 + 1e-6)
    assert np.all(np.abs(back - w) <= bound)
    assert np.abs(back - w).mean() < (0.03 if kind == "nf4" else 0.003) * np.abs(w).max()


def test_zero_block_and_bad_input():
    w = np.zeros((64, 4), np.float32)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w)))), w)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w), "int8"))), w)
    with pytest.raises(ValueError, match="valid: nf4, int8"):
        quant.quantize(jnp.asarray(w), "nf3")
    with pytest.raises(ValueError, match="only 2-D kernels and 3-D expert stacks"):
        quant.quantize(jnp.zeros((4,)), "nf4")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_matmul_and_its_input_gradient_use_the_dequantized_kernel(kind):
    w = kernel(128, 16, seed=4)
    q = quant.quantize(jnp.asarray(w), kind)
    dense = np.asarray(quant.dequantize(q))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 128)).astype(np.float32))
    f = lambda x: jnp.sum(jnp.sin(quantized_matmul(x, q)))
    g = lambda x: jnp.sum(jnp.sin(x @ dense))
    np.testing.assert_allclose(jax.jit(f)(x), g(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(g)(x), rtol=1e-5, atol=1e-7)


def test_safetensors_entries_round_trip():
    w = kernel(128, 8, seed=6)
    for kind, dq in (("nf4", True), ("nf4", False), ("int8", False)):
        q = quant.quantize(jnp.asarray(w), kind, dq)
        arrays, info = quant.to_tensors("a.kernel", q)
        back = quant.from_tensors("a.kernel", arrays, info)
        assert back.kind == q.kind and back.shape == q.shape and back.block_size == q.block_size
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="quant_scale is missing"):
        quant.from_tensors("a.kernel", {"a.kernel.quant_data": arrays["a.kernel.quant_data"]}, info)


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_expert_stacks_quantize_expert_by_expert(kind, double_quant):
    """A MoE's (E, in, out) stack is E kernels: each expert's int8 absmaxes and NF4 blocks are its
    own (in=100 is padded per expert, so no block spans two experts). Without double quant the
    codes equal quantizing each expert alone; double quant shares one second level (and offset)
    over the stack, so the absmaxes round slightly differently."""
    from peftjax.models.moe import quantized_grouped_matmul

    w = np.stack([kernel(100, 24, seed=s) for s in range(3)])
    q = quant.quantize(jnp.asarray(w), kind, double_quant)
    assert q.shape == (3, 100, 24)
    back = np.asarray(quant.dequantize(q))
    alone = np.stack([np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w[e]), kind, double_quant)))
                      for e in range(3)])
    if double_quant:
        assert np.abs(back - alone).max() < 0.02 * np.abs(w).max()
    else:
        np.testing.assert_array_equal(back, alone)
    arrays, info = quant.to_tensors("x.experts.down_proj", q)
    again = quant.dequantize(quant.from_tensors("x.experts.down_proj", arrays, info))
    np.testing.assert_array_equal(np.asarray(again), back)
    # the grouped matmul on the quantized stack, and its input gradient, use the dequantized one
    x = jnp.asarray(np.random.default_rng(5).standard_normal((7, 100)).astype(np.float32))
    sizes = jnp.array([3, 0, 4], jnp.int32)
    f = lambda x: jnp.sum(jnp.sin(quantized_grouped_matmul(x, q, sizes)))
    g = lambda x: jnp.sum(jnp.sin(jax.lax.ragged_dot(x, jnp.asarray(back), sizes)))
    np.testing.assert_allclose(jax.jit(f)(x), g(x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(g)(x), rtol=1e-5, atol=1e-6)

"""The fused quantized matmul (peftjax/models/quant_matmul.py): a Pallas kernel that reads packed
NF4 / int8 codes. Its values are checked here through Pallas' interpreter on the CPU (the same
kernel body the GPU compiles); that it compiles for an H100 and leaves no float kernel among the
temporaries is tests/test_gpu_target.py's (needs `make gpu-aot`)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import gpu_target
from peftjax.models import quant, quant_matmul

GPU = types.SimpleNamespace(platform="gpu")


def _kernel(n_in, n_out, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n_in, n_out)) * 0.05,
                       jnp.float32)


def _rows(m, n, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, n)), jnp.float32).astype(dtype)


def test_nf4_select_tree_is_the_code_table():
    codes = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(quant_matmul._nf4_value(codes)), quant.NF4_CODE)


@pytest.mark.parametrize("kind,double_quant,n_in", [("nf4", True, 200), ("nf4", False, 128),
                                                      ("int8", False, 96)])
def test_the_kernel_dequantizes_bit_for_bit(kind, double_quant, n_in):
    """Identity rows times the kernel give every dequantized weight back exactly (each output is
    one product with 1.0, in float32): the in-kernel dequantization is quant.dequantize's."""
    q = quant.quantize(_kernel(n_in, 48), kind, double_quant=double_quant)
    eye = jnp.eye(n_in, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = quant_matmul.matmul(eye, q, True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(quant.dequantize(q, jnp.float32)))


CASES = [  # kind, double quant, (rows, in, out), compute dtype: padding of rows and of NF4 blocks
    ("nf4", True, (40, 130, 96), jnp.float32),
    ("nf4", False, (70, 256, 128), jnp.bfloat16),
    ("nf4", True, (5, 64, 16), jnp.bfloat16),
    ("int8", False, (33, 96, 48), jnp.float32),
    ("int8", False, (64, 48, 80), jnp.bfloat16),
]


@pytest.mark.parametrize("kind,double_quant,shape,dtype", CASES)
def test_forward_and_input_gradient_match_dequantize_then_dot(kind, double_quant, shape, dtype):
    m, n_in, n_out = shape
    q = quant.quantize(_kernel(n_in, n_out), kind, double_quant=double_quant)
    x, dy = _rows(m, n_in, dtype), _rows(m, n_out, dtype, seed=2)
    y, vjp = jax.vjp(lambda x: quant_matmul.matmul(x, q, True), x)
    ref_y, ref_vjp = jax.vjp(lambda x: quant_matmul.reference(x, q), x)
    assert y.dtype == dtype and y.shape == (m, n_out)
    # the same products, summed in another order (f32 accumulation both)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref_y, np.float32), **tol)
    (dx,), (ref_dx,) = vjp(dy), ref_vjp(dy)
    assert dx.shape == x.shape
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ref_dx, np.float32), **tol)


def test_leading_axes_and_zero_cotangents_for_the_codes():
    q = quant.quantize(_kernel(64, 32), "nf4")
    x = _rows(6, 64, jnp.float32).reshape(2, 3, 64)
    assert quant_matmul.matmul(x, q, True).shape == (2, 3, 32)
    grads = jax.grad(lambda q: jnp.sum(quant_matmul.matmul(x, q, True)), allow_int=True)(q)
    assert grads.data.dtype == jax.dtypes.float0 and not np.any(np.asarray(grads.scale2))


def test_which_path_a_layer_takes():
    nf4 = quant.quantize(_kernel(64, 32), "nf4")
    assert quant_matmul.mode_for(nf4) == "xla"                     # a CPU program
    with gpu_target.compiling_for(GPU):
        assert quant_matmul.mode_for(nf4) == "fused"
        with quant_matmul.partitioned():                           # a pallas call has no sharding rule
            assert quant_matmul.mode_for(nf4) == "xla"
        with quant_matmul.using("xla"):                            # a run's model.quant_matmul
            assert quant_matmul.mode_for(nf4) == "xla"
        assert quant_matmul.mode_for(nf4) == "fused"
        assert quant_matmul.mode_for(quant.quantize(jnp.ones((2, 64, 32)), "nf4")) == "fused"  # experts
        # shapes it does not tile: an out dim not a multiple of 16, int8's in dim neither
        assert quant_matmul.mode_for(quant.quantize(_kernel(64, 24), "nf4")) == "xla"
        assert quant_matmul.mode_for(quant.quantize(_kernel(40, 32), "int8")) == "xla"


def test_a_bad_mode_lists_the_valid_ones(monkeypatch):
    monkeypatch.setattr(quant_matmul, "QUANT_MATMUL", "triton")
    with pytest.raises(ValueError, match="mode 'triton' is invalid; valid: auto, xla, fused, interpret"):
        quant_matmul.mode_for(quant.quantize(_kernel(64, 32), "nf4"))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_qlora_step_through_the_kernel_matches_xlas_path(kind, monkeypatch):
    """The whole model: a LoRA train step on a quantized tiny Llama (SGD, learning rate 1, so
    the update is the gradient) gives the same loss and update whichever path its linear layers
    take, and the fused path is the one traced."""
    import optax

    from peftjax import methods
    from peftjax.train import init_state, make_train_step, quantize
    from tests.helpers import METHOD_CONFIGS, fisher_context, learnable_batch, tiny_model

    model, base = tiny_model("llama")
    method = methods.create("lora", model, METHOD_CONFIGS["lora"])
    peft = quantize.setup(method, jax.random.PRNGKey(1), base, fisher_context(model),
                          quantize.QuantConfig(kind))
    tx = optax.sgd(1.0)
    state = init_state(peft.trainable, peft.state, tx)
    batch = learnable_batch(model)

    def run(mode):
        monkeypatch.setattr(quant_matmul, "QUANT_MATMUL", mode)
        step = make_train_step(method, tx, seed=0)   # a fresh function: its own trace
        jaxpr = str(jax.make_jaxpr(step)(state, peft.frozen, batch))
        return jaxpr, step(state, peft.frozen, batch)

    jaxpr, (new, metrics) = run("interpret")
    assert "pallas_call" in jaxpr
    xla_jaxpr, (ref_new, ref_metrics) = run("xla")
    assert "pallas_call" not in xla_jaxpr
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    assert float(metrics["grad_norm"]) > 0
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(ref_new.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs the compiled kernel on a GPU")
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_the_compiled_kernel_on_this_gpu(kind):
    """Where a GPU is attached: the Triton-compiled kernel (``auto`` picks it) against XLA's path."""
    q = quant.quantize(_kernel(4096, 1024), kind)
    x, dy = _rows(300, 4096, jnp.bfloat16), _rows(300, 1024, jnp.bfloat16, seed=2)
    assert quant_matmul.mode_for(q) == "fused"
    y, vjp = jax.vjp(lambda x: quant_matmul.matmul(x, q), x)
    ref_y, ref_vjp = jax.vjp(lambda x: quant_matmul.reference(x, q), x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref_y, np.float32), rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(vjp(dy)[0], np.float32), np.asarray(ref_vjp(dy)[0], np.float32),
                               rtol=2e-2, atol=5e-2)


def test_the_gpu_benchmark_runs_its_smoke_mode(tmp_path):
    """experiments/quant_minilm/gpu_bench.py (for a machine lent a GPU) runs end to end with tiny
    shapes and the kernel interpreted, and refuses a CPU for real timings."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    script = "experiments/quant_minilm/gpu_bench.py"
    out = subprocess.run([sys.executable, script, "--smoke", f"--out={tmp_path}/b.json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.load(open(tmp_path / "b.json"))["rows"]
    assert {(r["kind"], r["path"], "experts" in r) for r in rows} == {
        (k, p, False) for k in ("nf4", "int8") for p in ("fused", "xla", "bf16 matmul (no quantization)")
    } | {(k, p, True) for k in ("nf4", "int8") for p in ("fused", "xla")}
    assert all(r["median_s"] > 0 for r in rows)
    assert all(r["max_abs_dev_from_xla"] < 1e-2 for r in rows if r["path"] == "fused")
    refused = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and "needs a GPU" in refused.stderr


@pytest.mark.parametrize("kind,double_quant,n_in,dtype", [("nf4", True, 96, jnp.float32),
                                                          ("nf4", False, 128, jnp.bfloat16),
                                                          ("int8", False, 48, jnp.float32)])
def test_an_expert_stack_through_the_kernel_matches_xlas_grouped_path(kind, double_quant, n_in, dtype,
                                                                      monkeypatch):
    """A MoE's quantized stack (moe.quantized_grouped_matmul): rows sorted by expert, uneven
    groups and an empty expert, each tile of rows reading its own expert's codes; forward and
    input gradient equal XLA's dequantize-then-grouped-matmul."""
    from peftjax.models import moe

    experts, n_out = 4, 32
    stack = jnp.asarray(np.random.default_rng(3).standard_normal((experts, n_in, n_out)) * 0.05,
                        jnp.float32)
    q = quant.quantize(stack, kind, double_quant=double_quant)
    sizes = jnp.array([13, 0, 40, 7], jnp.int32)
    x, dy = _rows(60, n_in, dtype), _rows(60, n_out, dtype, seed=2)

    def run(mode):
        monkeypatch.setattr(quant_matmul, "QUANT_MATMUL", mode)
        f = lambda x: moe.quantized_grouped_matmul(x, q, sizes)
        assert ("pallas_call" in str(jax.make_jaxpr(f)(x))) == (mode == "interpret")
        y, vjp = jax.vjp(f, x)
        return y, vjp(dy)[0]

    (y, dx), (ref_y, ref_dx) = run("interpret"), run("xla")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref_y, np.float32), **tol)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ref_dx, np.float32), **tol)

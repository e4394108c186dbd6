"""Compiling for a GPU without one (peftjax/gpu_target.py, scripts/memory.py --compile_for).

The compile itself needs jax's CUDA plugin (`make gpu-aot`, ~5 GB), which CI does not install: that
test runs where the plugin is present and is skipped elsewhere. The errors are checked everywhere.
"""

import json
import os

import pytest

from peftjax import gpu_target
from tests.helpers import ROOT, run_script


def _memory(*args, env=None):
    return run_script("memory.py", *args, timeout=600, env=env)


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown GPU target 'a100'; valid: h100"):
        gpu_target.target_device("a100")


@pytest.mark.skipif(gpu_target.cuda_plugin_found(), reason="the CUDA plugin is installed in this environment")
def test_missing_plugin_is_one_clear_error(tmp_path):
    out = _memory("--config=configs/train.py:model=tiny-bert,method=lora", "--compile_for=h100",
                  env={"PEFTJAX_GPU_AOT": str(tmp_path)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: compiling for GPU target 'h100' needs jax's CUDA plugin, which is not installed: "
        f"`make gpu-aot` installs jax's CUDA plugin (jax-cuda12-plugin[with-cuda]=="
        f"{__import__('jax').__version__}, ~5 GB) into {os.path.relpath(str(tmp_path), ROOT)}/"]


NEEDS_PLUGIN = pytest.mark.skipif(
    not (gpu_target.cuda_plugin_found()
         or os.path.isdir(os.path.join(gpu_target.PLUGIN_DIR, "jax_plugins"))),
    reason="needs jax's CUDA plugin (make gpu-aot)")


@NEEDS_PLUGIN
def test_compiles_a_train_step_for_an_h100_without_one():
    """XLA:GPU's plan of a tiny LoRA step: the row names the target, its arguments hold at least
    the params, optimizer state and batch, and the state is donated (aliased) as on the CPU."""
    out = _memory("--config=configs/train.py:model=tiny-llama,method=lora", "--head=causal_lm",
                  "--batch=4", "--seq=16", "--compile_for=h100",
                  env={"XLA_FLAGS": "--xla_gpu_autotune_level=0"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert (r["backend"], r["device_kind"], r["deviceless"]) == ("gpu", "NVIDIA H100 80GB HBM3", True)
    b, x = r["bytes"], r["xla"]
    assert x["argument_bytes"] >= b["params"] + b["optimizer_state"] + b["batch"]
    assert x["alias_bytes"] >= b["trainable_params"] + b["optimizer_state"]
    assert r["peak_bytes"] == x["argument_bytes"] + x["output_bytes"] + x["temp_bytes"] - x["alias_bytes"]
    assert r["flops"] > 0 and r["flops_of"] == "unoptimized HLO"


@NEEDS_PLUGIN
def test_the_fused_quantized_matmul_compiles_for_an_h100_and_reads_the_codes():
    """peftjax/models/quant_matmul.py's Pallas kernel through XLA:GPU (Triton to PTX for sm_90a):
    one custom call per product, forward and backward, and none of the float kernel that XLA's
    own dequantize-then-dot writes out (experiments/quant_minilm/gpu_fusion.py)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "experiments/quant_minilm/gpu_fusion.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "XLA_FLAGS": "--xla_gpu_autotune_level=0"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    mib = lambda row: int(row.split("temporaries ")[1].split(" MiB")[0])
    assert mib(rows["peftjax quant.dequantize (nf4)"]) >= 32          # the bf16 kernel written out
    for kind in ("nf4", "int8"):
        fused = rows[f"peftjax fused kernel ({kind}), forward and input gradient"]
        assert fused.count("__gpu$xla.gpu.triton") == 2, fused
        assert "bf16[4096,4096]" not in fused and mib(fused) <= 1, fused   # NF4: its absmaxes


@NEEDS_PLUGIN
def test_a_quantized_step_for_a_gpu_calls_the_fused_kernel_unless_configured_otherwise():
    rows = {}
    for matmul in ("auto", "xla"):
        out = _memory("--config=configs/train.py:model=tiny-llama,method=lora", "--head=causal_lm",
                      "--batch=4", "--seq=16", "--compile_for=h100", "--config.model.quant=nf4",
                      f"--config.model.quant_matmul={matmul}",
                      env={"XLA_FLAGS": "--xla_gpu_autotune_level=0"})
        assert out.returncode == 0, out.stderr[-3000:]
        rows[matmul] = json.loads(out.stdout)
    assert rows["auto"]["fused_quant_kernels"] > 0 and rows["xla"]["fused_quant_kernels"] == 0
    assert rows["auto"]["flops_of"].endswith("quantized matmuls as XLA's dequantize-then-dot")
    assert rows["xla"]["flops"] == rows["auto"]["flops"]   # the same program, counted on the host


SPILL_CHECK = """
import sys
from peftjax.gpu_target import compiling_for, placed, target_device
device = target_device(sys.argv[1])
import jax, jax.numpy as jnp
from peftjax.models import quant, quant_matmul
for kind in ("nf4", "int8"):
    q = quant.abstract(jax.eval_shape(lambda: quant.quantize(jnp.zeros((4096, 11008)), kind)))
    x, dy = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((512, 4096), (512, 11008)))
    def step(q, x, dy):
        y, vjp = jax.vjp(lambda x: quant_matmul.matmul(x, q), x)
        return y, vjp(dy)[0]
    with compiling_for(device):
        jax.jit(step).lower(*placed((q, x, dy), device)).compile()
    # a MoE's expert stack (Qwen3-30B-A3B's down projection shape), rows in tiles of one expert
    from peftjax.models import moe
    q = quant.abstract(jax.eval_shape(lambda: quant.quantize(jnp.zeros((8, 768, 2048)), kind)))
    x, dy = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((512, 768), (512, 2048)))
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32)
    def grouped(q, x, dy, sizes):
        y, vjp = jax.vjp(lambda x: moe.quantized_grouped_matmul(x, q, sizes), x)
        return y, vjp(dy)[0]
    with compiling_for(device):
        text = jax.jit(grouped).lower(*placed((q, x, dy, sizes), device)).compile().as_text()
    assert text.count("xla.gpu.triton") >= 2, "the grouped products are not the fused kernel"
"""


@NEEDS_PLUGIN
@pytest.mark.parametrize("target", ["h100", "rtx4090"])
def test_the_fused_kernels_compile_without_register_spills(target):
    """ptxas reports the fused kernels' registers (XLA logs them at verbosity 2): none spilled to
    local memory, forward and backward, NF4 and int8, on Hopper (wgmma) and Ada (mma.sync)."""
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_gpu_autotune_level=0", "TF_CPP_MIN_LOG_LEVEL": "0",
           "TF_CPP_VMODULE": "subprocess_compilation=2", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", SPILL_CHECK, target], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels = [ln for ln in out.stderr.splitlines() if "ptxas info" in ln and "registers" in ln]
    assert len(kernels) >= 8, out.stderr[-3000:]
    assert "spilled" not in out.stderr, [ln for ln in out.stderr.splitlines() if "spill" in ln]


def test_trace_time_backend_choice_follows_the_target():
    """moe.grouped_matmul picks the tiled scan for the CPU and ragged_dot (a grouped GEMM) for a
    GPU: inside compiling_for(<a GPU device>) a CPU host traces the GPU's program."""
    import types

    import jax
    import jax.numpy as jnp

    from peftjax.models import moe

    x, w = jnp.ones((6, 4)), jnp.ones((3, 4, 5))
    sizes = jnp.array([2, 1, 3], jnp.int32)
    # a fresh function each time: JAX caches a function's trace by its argument shapes
    prims = lambda: str(jax.make_jaxpr(lambda *a: moe.grouped_matmul(*a))(x, w, sizes))
    assert gpu_target.compile_platform() == jax.default_backend() == "cpu"
    assert "ragged_dot" not in prims()
    with gpu_target.compiling_for(types.SimpleNamespace(platform="gpu")):
        assert gpu_target.compile_platform() == "gpu"
        assert "ragged_dot" in prims()
    assert gpu_target.compile_platform() == "cpu"

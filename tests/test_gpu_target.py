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


@pytest.mark.skipif(not (gpu_target.cuda_plugin_found()
                         or os.path.isdir(os.path.join(gpu_target.PLUGIN_DIR, "jax_plugins"))),
                    reason="needs jax's CUDA plugin (make gpu-aot)")
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

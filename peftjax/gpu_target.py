"""Compile for a GPU that is not attached: XLA's GPU compiler driven by a device description.

Why: the memory table's figures are XLA's buffer plan of the compiled train step
(``peftjax.train.memory``), and that plan is backend-specific. The CPU backend has no bf16
matmul — it converts both operands of every bf16 dot to f32 and keeps the copies — so a bf16 base
plans ~3× what a GPU would (llama2-7b LoRA on a bf16 base: 40.87 GiB on the CPU backend, 14.61 GiB
compiled for an H100). JAX's CUDA PJRT plugin can compile for a *topology description* instead of
a device ("deviceless" ahead-of-time compilation, as for TPUs): ``get_topology_desc(platform=
"cuda", target_config=<GpuTargetConfigProto>)`` gives compile-only devices, and a jitted function
lowered on inputs sharded onto one of them compiles with the full XLA:GPU pipeline (fusion,
scheduling, buffer assignment) for that GPU. Nothing runs and nothing is allocated.

What it is and is not: the plan XLA:GPU makes for the step, the same quantity the GPU rows of the
memory table report from a compile on an attached card — checked: llama2-7b LoRA r8 fp32
(batch 8 × 64) plans 28.852 GiB compiled here for an H100 (jax 0.10.2) and 28.854 GiB compiled on
an attached H200 (jax 0.11.2, ``experiments/memory_table/gpu/llama2_7b.json``). It is not a
measurement of a card: the CUDA context, cuBLAS/cuDNN workspaces and the allocator's rounding come
on top (PyTorch's published figures include theirs). GEMM autotuning cannot run without a device;
compile with ``XLA_FLAGS=--xla_gpu_autotune_level=0`` (as the attached-card rows were) so both
take the default GEMM configurations.

The plugin (``jax-cuda12-plugin[with-cuda]`` at jax's own version, with the CUDA libraries it
loads even to compile, ~5 GB) is not a dependency of peftjax: ``make gpu-aot`` installs it into
``.gpu_aot/`` (or ``$PEFTJAX_GPU_AOT``), which :func:`target_device` adds to ``sys.path``. JAX
discovers plugins when it first initialises its backends, so call :func:`target_device` before
any JAX computation; it then restricts the process's own backends to the CPU (an explicit
``JAX_PLATFORMS`` wins), which is all a compile for a description needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where `make gpu-aot` puts the plugin; PEFTJAX_GPU_AOT names another folder installed the same way
# (pip install --target DIR). A plugin installed in the environment itself is found too.
PLUGIN_DIR = os.environ.get("PEFTJAX_GPU_AOT", os.path.join(ROOT, ".gpu_aot"))

# Device descriptions (xla.GpuTargetConfigProto, text format): what XLA:GPU reads from a device
# query when one is attached, from the vendors' published figures (datasheets; the CUDA
# programming guide's per-compute-capability limits). The plan depends on the card beyond its
# architecture: when a step would not fit, XLA's rematerialisation pass recomputes values to bring
# it under the device's memory (less a margin), so the same step plans less on a smaller card
# (llama2-7b full fine-tuning: 91.58 GiB for an H200 141 GB, as compiled on an attached one;
# 82.91 GiB for an H100 80 GB, where the pass reports it could not reach its 75.31 GiB limit).
# CUDA 12.8 / cuDNN 9.8 runtimes: what the plugin's wheels ship against.
_RUNTIME = """
runtime_version { major: 12 minor: 8 }
dnn_version_info { major: 9 minor: 8 }
platform_name: "CUDA"
"""


def _device(*, name: str, cc: tuple[int, int], sms: int, memory: int, bandwidth: float, l2: int,
            clock_ghz: float, smem_per_sm: int, smem_per_block_optin: int, threads_per_sm: int) -> str:
    major, minor = cc
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_sm}
  shared_memory_per_block_optin: {smem_per_block_optin}
  threads_per_core_limit: {threads_per_sm}
  core_count: {sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock_ghz}
  device_memory_size: {memory}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
device_description_str: "{name}"
""" + _RUNTIME


MIB = 2 ** 20
TARGETS = {
    # H100 SXM5: 132 SMs, 228 KiB shared memory per SM (227 KiB per block), 50 MiB L2, HBM3 3.35 TB/s;
    # memory as its device query reports it (the others: as nvidia-smi prints it, in MiB).
    "h100": _device(name="NVIDIA H100 80GB HBM3", cc=(9, 0), sms=132, memory=84929347584,
                    bandwidth=3.35232e12, l2=50 * MIB, clock_ghz=1.98, smem_per_sm=228 * 1024,
                    smem_per_block_optin=227 * 1024, threads_per_sm=2048),
    # H200 SXM: the H100's chip with 141 GB of HBM3e at 4.8 TB/s.
    "h200": _device(name="NVIDIA H200", cc=(9, 0), sms=132, memory=143771 * MIB, bandwidth=4.8e12,
                    l2=50 * MIB, clock_ghz=1.98, smem_per_sm=228 * 1024,
                    smem_per_block_optin=227 * 1024, threads_per_sm=2048),
    # GeForce RTX 4090 (the 24 GB consumer card): AD102, compute capability 8.9, 128 SMs,
    # 100 KiB shared memory per SM (99 KiB per block), 1536 threads per SM, 72 MiB L2,
    # GDDR6X 1.008 TB/s, 2.52 GHz boost.
    "rtx4090": _device(name="NVIDIA GeForce RTX 4090", cc=(8, 9), sms=128, memory=24564 * MIB,
                       bandwidth=1.008e12, l2=72 * MIB, clock_ghz=2.52, smem_per_sm=100 * 1024,
                       smem_per_block_optin=99 * 1024, threads_per_sm=1536),
}

INSTALL_HINT = ("`make gpu-aot` installs jax's CUDA plugin (jax-cuda12-plugin[with-cuda]=="
                f"{jax.__version__}, ~5 GB) into {os.path.relpath(PLUGIN_DIR, os.getcwd())}/")


class TargetUnavailable(RuntimeError):
    """The GPU target cannot be compiled for here (no plugin, or JAX initialised without it)."""


def cuda_plugin_found() -> bool:
    """Whether jax's CUDA plugin is importable from the current ``sys.path``."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:
        return False


def _plugin_importable() -> bool:
    if os.path.isdir(PLUGIN_DIR) and PLUGIN_DIR not in sys.path:
        sys.path.append(PLUGIN_DIR)
    return cuda_plugin_found()


def placed(tree: Any, device: jax.Device) -> Any:
    """``tree``'s arrays or shapes as ``ShapeDtypeStruct``s on ``device``: lowering a jitted
    function on them compiles it for that device's backend (a compile-only GPU included)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def target_device(name: str) -> jax.Device:
    """A compile-only device of GPU target ``name`` (a key of ``TARGETS``).

    Raises ``ValueError`` for an unknown name and :class:`TargetUnavailable` when the CUDA plugin
    is not installed or JAX's backends were initialised before this call (the plugin is only
    discovered then).
    """
    if name not in TARGETS:
        raise ValueError(f"unknown GPU target {name!r}; valid: {', '.join(sorted(TARGETS))}")
    if not _plugin_importable():
        raise TargetUnavailable(f"compiling for GPU target {name!r} needs jax's CUDA plugin, which "
                                f"is not installed: {INSTALL_HINT}")
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        # Without a GPU the plugin registers only when CUDA is not among the platforms to
        # initialise (its start-up check would fail on the missing driver); compiling for a
        # description needs the registration, not a CUDA client. An explicit JAX_PLATFORMS wins.
        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(name, "cuda", target_config=TARGETS[name],
                                            topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        raise TargetUnavailable(
            f"jax's CUDA plugin did not register ({str(e).splitlines()[0]}): call "
            "gpu_target.target_device before any JAX computation, and with JAX_PLATFORMS unset "
            "or including cpu") from e
    return topo.devices[0]


_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftjax_compile_platform",
                                                                      default=None)


def compile_platform() -> str:
    """The platform the program being traced will be compiled for: the target's inside
    :func:`compiling_for`, else JAX's default backend. Trace-time choices that depend on the
    backend read it (``moe.grouped_matmul``: a grouped GEMM on GPUs, a tiled scan on the CPU), so
    a deviceless GPU compile traces the GPU's program, not the host's. JAX caches a function's
    trace by its argument shapes, not by this: trace a fresh function (as ``analyze_train_step``
    does) rather than one already traced for another platform."""
    return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(device: jax.Device) -> Iterator[None]:
    """Trace for ``device``'s platform (see :func:`compile_platform`)."""
    token = _PLATFORM.set(device.platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)

"""What a timing ran on: the CPU (model, vector instruction sets), its measured matmul rate, and
how busy the machine was.

Why: the benchmarks report ratios taken on whichever machine a session is lent, and these
machines differ while looking alike ("AMD EPYC", 2 cores). The train-step runs of 2026-12-05/06
in experiments/speed reached 330-380 GFLOP/s (XLA's cost analysis of the step over its measured
time) on 2 cores; on 2026-12-06's machine, a 2-core AMD EPYC of family 25 model 1 (Zen 3, AVX2,
no AVX-512), XLA's own 2048² fp32 matmul reaches ~170 GFLOP/s, and the same commands gave step
ratios against PyTorch of ~0.8-1.3 where the earlier runs gave 0.4-0.8. A timing is only
comparable with the CPU it ran on, so every benchmark JSON carries ``describe()``.

``matmul_gflops`` measures what the host gives XLA on a dense fp32 matmul (the bound a train
step's GFLOP/s is read against: on CPU it plays the part of a GPU's datasheet peak in MFU).
"""

from __future__ import annotations

import os
import platform
import re
from typing import Any, Callable

# The vector and matrix extensions that decide how fast XLA's and PyTorch's kernels run here.
ISA = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
       "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask; XLA's and PyTorch's pools size to it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``key: value`` lines of Linux's cpuinfo ({} where there is none)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def cpu(path: str = "/proc/cpuinfo") -> dict:
    """Model name, vendor, family/model/stepping, clock as reported and the ISA extensions present.

    A virtual machine may report a generic model name ("AMD EPYC"); family and model still tell
    the generation (AMD family 25 = Zen 3/4, 26 = Zen 5; Intel family 6 with its model number).
    """
    info = _cpuinfo(path)
    flags = set(info.get("flags", "").split())
    return {"model_name": info.get("model name") or platform.processor() or platform.machine(),
           "vendor": info.get("vendor_id"), "family": _int(info.get("cpu family")),
           "model": _int(info.get("model")), "stepping": _int(info.get("stepping")),
           "mhz": _float(info.get("cpu MHz")), "isa": [f for f in ISA if f in flags] if flags else None,
           "cpus": cpus(), "cpu_count": os.cpu_count()}


def label(info: dict | None = None) -> str:
    """A short, file-name-safe name for a host type, e.g. ``amd-epyc-f25m1-avx2-2cpu``: the same
    for two machines of one kind, different where the CPU generation, widest vector ISA or CPU
    count differ (the folder experiments/speed/run.sh writes a host's runs into)."""
    info = cpu() if info is None else info
    name = re.sub(r"\(r\)|\(tm\)|\bcpu\b|@.*$|\bprocessor\b|\d+-core", "", (info["model_name"] or "cpu").lower())
    name = "-".join(re.findall(r"[a-z0-9]+", name))[:40] or "cpu"
    gen = f"-f{info['family']}m{info['model']}" if info.get("family") is not None else ""
    isa = info.get("isa") or []
    widest = next((f for f in ("amx_tile", "avx512f", "avx2", "avx") if f in isa), None)
    widest = {"amx_tile": "amx", "avx512f": "avx512"}.get(widest, widest)
    return f"{name}{gen}{'-' + widest if widest else ''}-{info['cpus']}cpu"


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of XLA's ``n × n`` matmul on the default device (median of ``repeats`` after
    one untimed call): what the host's cores give a large dense kernel right now."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x: x @ x)
    return gflops_rate(lambda: f(a).block_until_ready(), 2 * n ** 3, repeats)


def gflops_rate(call: Callable[[], Any], flops: float, repeats: int = 5) -> float:
    """GFLOP/s of ``call`` (blocking until its result is ready, ``flops`` of work): the median of
    ``repeats`` timed calls after one untimed one. The PyTorch side's matmul uses it too."""
    from peftjax.train import measure

    return round(flops / measure.median(measure.time_calls(call, repeats, warmup=1)) / 1e9, 1)


def describe(measure: bool = True) -> dict:
    """Everything a benchmark JSON records about its machine: ``cpu()``, the platform, the load
    average when called, and (``measure``) XLA's matmul GFLOP/s."""
    out = {"cpu": cpu(), "platform": platform.platform(),
           "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    out["label"] = label(out["cpu"])
    if measure:
        out["xla_matmul_gflops"] = matmul_gflops()
    return out


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


if __name__ == "__main__":   # python -m peftjax.host [--label]: run.sh names its folder with it
    import json
    import sys

    print(label() if "--label" in sys.argv[1:] else json.dumps(describe(), indent=2))

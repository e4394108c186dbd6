"""Measurements of compiled steps: XLA memory analysis and wall-clock step time.

``peak_memory_bytes`` is XLA's static accounting of a compiled step — arguments + outputs +
temporaries − aliased (donated) buffers — available on every backend without running it. On
CPU temporaries include dtype up-casts that a GPU may fuse, so figures are backend-specific.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def memory_analysis(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:  # some backends report nothing
        return {}
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["peak_memory_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                                - out["alias_bytes"])
    return out


def cost_analysis(compiled) -> dict[str, float]:
    c = compiled.cost_analysis()
    if isinstance(c, list):
        c = c[0] if c else {}
    return {"flops": float(c.get("flops", 0.0))} if c else {}


def time_calls(fn: Callable[[], Any], steps: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None

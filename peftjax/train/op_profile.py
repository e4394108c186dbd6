"""Where a compiled step's time goes, per XLA op: a jax.profiler trace summarised against the
step's optimized HLO.

Why: a step's wall time alone cannot tell a slow matrix product from a copy XLA inserted around
it. On CPU every executed op (a fusion, a dot, a copy) is a traced event named as its HLO
instruction, so joining the trace with ``compiled.as_text()`` gives each op's time with its
output shape, whether it multiplies matrices, and the jax source op it came from (its
``op_name`` metadata). That is how full fine-tuning's transposed weight-gradient copies were
found (``peftjax.models.layers.dot_rows``).

Caveats, stated with the numbers: XLA:CPU's thunk executor runs independent ops concurrently on
the intra-op threads, so the ops' summed time exceeds the step's wall time (``overlap`` is their
ratio), and a concurrently running op takes longer than it would alone. Tracing itself adds a
few percent.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any, Callable

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?) (\w[\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Each instruction of the module's text: ``{name: {shape, opcode, matmul, source}}``;
    ``matmul`` is true for dots and convolutions and for fusions whose body has one."""
    bodies: dict[str, list[str]] = {}
    current = None
    instructions = []
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            m = _COMPUTATION.match(line)
            current = m.group(1) if m and "(" in line else None
            if current:
                bodies[current] = []
            continue
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        name, shape, opcode, rest = m.groups()
        if current:
            bodies[current].append(opcode)
        calls = _CALLS.search(rest)
        source = _OP_NAME.search(rest)
        instructions.append((name, shape, opcode, calls.group(1) if calls else None,
                             source.group(1) if source else ""))
    out = {}
    for name, shape, opcode, calls, source in instructions:
        body = bodies.get(calls, []) if calls else []
        matmul = opcode in ("dot", "convolution") or any(o in ("dot", "convolution") for o in body)
        out[name] = {"shape": shape, "opcode": opcode, "matmul": matmul, "source": source}
    return out


def _kind(name: str, op: dict[str, Any]) -> str:
    if op["matmul"]:
        return "matmul"
    return re.sub(r"[.\d]+$", "", name)   # copy_bitcast_fusion.33 -> copy_bitcast_fusion


def summarize(events: list[dict], hlo_text: str, steps: int, top: int = 20) -> dict[str, Any]:
    """Per-step op time from complete ("X") trace events: by kind (``matmul``, or the fusion's
    name without its number, e.g. ``copy_bitcast_fusion``) and the ``top`` single ops."""
    ops = hlo_ops(hlo_text)
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        # Only events named as one of the module's instructions: the rest is the runtime's
        # bookkeeping (executor and thread-pool spans, argument handling, Python frames).
        if e.get("ph") == "X" and e["name"] in ops:
            per_op[e["name"]] += e["dur"] / 1e3 / steps
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, ms in per_op.items():
        kinds[_kind(name, ops[name])] += ms
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "steps": steps,
        "op_ms_per_step": round(sum(per_op.values()), 2),
        "by_kind_ms": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"op": name, "ms": round(ms, 2), **ops[name]} for name, ms in ranked],
    }


def profile(call: Callable[[], Any], compiled, steps: int, trace_dir: str,
            top: int = 20) -> dict[str, Any]:
    """Run ``call`` (one step, blocking until done) ``steps`` times under ``jax.profiler`` into
    ``trace_dir`` (kept: open it in Perfetto or TensorBoard) and summarise it against
    ``compiled``'s HLO; ``overlap`` needs the caller's untraced step time, so it is left to it."""
    import jax

    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            call()
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}")
    with gzip.open(found[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {"trace": found[-1], **summarize(events, compiled.as_text(), steps, top)}

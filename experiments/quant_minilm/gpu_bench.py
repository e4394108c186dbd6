"""Time the quantized matmul on an attached GPU: peftjax's fused kernel (quant_matmul) against
XLA's dequantize-then-dot and a plain bf16 matmul, forward + input gradient, for llama2-7b's
layer shapes. For a machine lent a GPU (no figure here comes from one yet):

    python experiments/quant_minilm/gpu_bench.py --out=experiments/quant_minilm/gpu_bench_<card>.json

prints one JSON row per (shape, rows, kind, path): the median of ``--repeats`` timed calls after
warm-up, and the fused path's largest deviation from XLA's; then the same for Qwen3-30B-A3B's
quantized expert stacks (grouped products, rows in tiles of one expert). ``--smoke`` runs tiny shapes with the
kernel interpreted (any backend; what the test suite runs): its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from peftjax.files import write_json_atomic  # noqa: E402
from peftjax.models import quant, quant_matmul  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]   # llama2-7b: attention, up/gate, down
ROWS = [16, 512, 4096]                                   # a decode batch, the memory table's 8 × 64, 8 × 512
# Qwen3-30B-A3B's expert stacks (128 experts; gate_up 2048 -> 1536, down 768 -> 2048), the
# (token, expert) pairs of 512 tokens routed to 8 experts each, spread evenly.
EXPERT_SHAPES = [(128, 2048, 1536), (128, 768, 2048)]
EXPERT_ROWS = [4096]


def _timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))                      # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(n_in: int, n_out: int, rows: int, kind: str, repeats: int, interpret: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((n_in, n_out), np.float32) * 0.02)
    q = quant.quantize(w, kind, double_quant=True)
    x = jnp.asarray(rng.standard_normal((rows, n_in), np.float32), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((rows, n_out), np.float32), jnp.bfloat16)
    wb = w.astype(jnp.bfloat16)

    def step(matmul):
        def run(x, dy):
            y, vjp = jax.vjp(matmul, x)
            return y, vjp(dy)[0]
        return jax.jit(run)

    paths = {
        "fused": step(lambda x: quant_matmul.matmul(x, q, interpret)),
        "xla": step(lambda x: quant_matmul.reference(x, q)),
        "bf16 matmul (no quantization)": step(lambda x: x @ wb),
    }
    y_fused, dx_fused = paths["fused"](x, dy)
    y_xla, dx_xla = paths["xla"](x, dy)
    deviation = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in ((y_fused, y_xla), (dx_fused, dx_xla)))
    out = []
    for name, fn in paths.items():
        out.append({"in": n_in, "out": n_out, "rows": rows, "kind": kind, "path": name,
                    "median_s": _timed(fn, (x, dy), repeats),
                    **({"max_abs_dev_from_xla": deviation} if name == "fused" else {})})
    return out


def bench_experts(experts: int, n_in: int, n_out: int, rows: int, kind: str, repeats: int,
                  interpret: bool) -> list[dict]:
    """The grouped product of a quantized expert stack (moe.quantized_grouped_matmul): the fused
    kernel against XLA's path (dequantize the stack, then ragged_dot)."""
    from peftjax.models import moe

    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.standard_normal((experts, n_in, n_out), np.float32) * 0.02)
    q = quant.quantize(stack, kind, double_quant=True)
    sizes = jnp.full((experts,), rows // experts, jnp.int32)
    x = jnp.asarray(rng.standard_normal((rows, n_in), np.float32), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((rows, n_out), np.float32), jnp.bfloat16)

    def step(mode):
        def run(x, dy):
            with quant_matmul.using(mode):
                y, vjp = jax.vjp(lambda x: moe.quantized_grouped_matmul(x, q, sizes), x)
                return y, vjp(dy)[0]
        return jax.jit(run)

    paths = {"fused": step("interpret" if interpret else "fused"), "xla": step("xla")}
    (y_f, dx_f), (y_x, dx_x) = paths["fused"](x, dy), paths["xla"](x, dy)
    deviation = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in ((y_f, y_x), (dx_f, dx_x)))
    return [{"experts": experts, "in": n_in, "out": n_out, "rows": rows, "kind": kind, "path": name,
             "median_s": _timed(fn, (x, dy), repeats),
             **({"max_abs_dev_from_xla": deviation} if name == "fused" else {})}
            for name, fn in paths.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted kernel")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = jax.devices()[0]
    if not args.smoke and device.platform != "gpu":
        sys.exit(f"error: needs a GPU (JAX's default device is {device.platform}); --smoke runs "
                 "tiny shapes with the kernel interpreted")
    shapes, rows = ([(128, 64)], [16]) if args.smoke else (SHAPES, ROWS)
    results = []
    for n_in, n_out in shapes:
        for m in rows:
            for kind in ("nf4", "int8"):
                for row in bench(n_in, n_out, m, kind, 2 if args.smoke else args.repeats, args.smoke):
                    print(json.dumps(row), flush=True)
                    results.append(row)
    expert_shapes, expert_rows = ([(4, 64, 32)], [64]) if args.smoke else (EXPERT_SHAPES, EXPERT_ROWS)
    for shape in expert_shapes:
        for m in expert_rows:
            for kind in ("nf4", "int8"):
                for row in bench_experts(*shape, m, kind, 2 if args.smoke else args.repeats, args.smoke):
                    print(json.dumps(row), flush=True)
                    results.append(row)
    if args.out:
        write_json_atomic(args.out, {"device": device.device_kind, "jax": jax.__version__,
                                     "smoke": args.smoke, "rows": results})


if __name__ == "__main__":
    main()

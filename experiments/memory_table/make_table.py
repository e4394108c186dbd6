"""Markdown tables from the memory table's JSON files (written by scripts/memory.py --out).

    python experiments/memory_table/make_table.py > experiments/memory_table/tables.md

GiB = 2^30 bytes, GB = 10^9 bytes. The published PyTorch figures (HF PEFT README, Dec 2022, via
../shared/reference/numbers.md) are copied beside the rows they correspond to.
"""

from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLISHED = {  # (model, method) -> peak GPU memory of plain PyTorch, as the README prints it
    ("T0_3B", "full"): "47.14GB", ("T0_3B", "lora"): "14.4GB",
    ("mt0-xxl", "full"): "OOM (80GB)", ("mt0-xxl", "lora"): "56GB",
    ("bloomz-7b1", "full"): "OOM (80GB)", ("bloomz-7b1", "lora"): "32GB",
}
ORDER = ["T0_3B", "mt0-xxl", "bloomz-7b1", "llama2-7b"]


def load(kind: str) -> list[dict]:
    """Every row of ``<kind>/*.json``; a row measured twice (same model, method, remat and peak,
    e.g. LoRA in both the method table and the remat series) is listed once."""
    rows, seen = [], set()
    for path in sorted(glob.glob(os.path.join(HERE, kind, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        for r in (data if isinstance(data, list) else [data]):
            if "_clip" in os.path.basename(path):  # the trainer's default clipping, not the seed's
                r = {**r, "method": r["method"] + " (clip_norm=1.0)"}
            setting = [f"{r['quant']} base" if r.get("quant", "none") != "none" else "",
                       f"{r['dtype']} compute" if r.get("dtype", "float32") != "float32" else "",
                       f"{r['frozen_dtype']} frozen" if r.get("frozen_dtype", "float32") != "float32"
                       and r.get("quant", "none") == "none" else "",
                       # quantized matmuls as peftjax's Pallas kernel (peftjax/models/quant_matmul.py)
                       "fused dequant-matmul" if r.get("fused_quant_kernels") else "",
                       "cuBLAS GEMMs" if "--xla_gpu_enable_triton_gemm=false" in r.get("xla_flags", "") else ""]
            if any(setting):   # not the seed's fp32 setting: the row says which it is
                r = {**r, "method": f"{r['method']} ({', '.join(x for x in setting if x)})"}
            key = (r["model"], r["method"], r.get("remat"), r.get("peak_bytes"), r.get("error"))
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def gib(x: int) -> str:
    return f"{x / 2 ** 30:.2f}"


def table(rows: list[dict], title: str) -> str:
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    lines = [f"### {title}", "",
             "| model | method | remat | trainable | total | params GiB | grads GiB | optimizer GiB "
             "| XLA temp GiB | peak GiB | peak GB | published (PyTorch) | TFLOP/step | compile s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    key = lambda r: (ORDER.index(r["model"]) if r["model"] in ORDER else 99,
                     r.get("remat", "none") != "none", r.get("remat", ""), r["method"] != "full", r["method"])
    for r in sorted(rows, key=key):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | | n/a: {r['error'][:120]} |" + " |" * 10)
            continue
        b, x = r["bytes"], r["xla"]
        pub = PUBLISHED.get((r["model"], r["method"]), "") if r["remat"] == "none" else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {r['remat']} | {r['trainable_params']:,} | {r['total_params']:,} "
            f"| {gib(b['params'])} | {gib(b['gradients'])} | {gib(b['optimizer_state'])} "
            f"| {gib(x['temp_bytes'])} | {gib(r['peak_bytes'])} | {r['peak_bytes'] / 1e9:.2f} | {pub} "
            f"| {r['flops'] / 1e12:.2f} | {r['compile_s']:.0f} |")
    first = rows[0]
    how = ("; compiled without the device (scripts/memory.py --compile_for), TFLOP/step counted on "
           "the unoptimized program" if first.get("deviceless") else "")
    lines += ["", f"backend {first['backend']} ({first['device_kind']}), jax {first['jax_version']}{how}"]
    return "\n".join(lines) + "\n"


SOURCES = [  # folder, title
    ("gpu", "GPU backend (compiled on an attached NVIDIA H200)"),
    ("h200_aot", "GPU compiler for an NVIDIA H200, without one (run_gpu_aot.sh: the cross-check)"),
    ("h100_aot", "GPU compiler for an NVIDIA H100, without one (run_gpu_aot.sh)"),
    ("rtx4090_aot", "GPU compiler for a GeForce RTX 4090 (24 GB), without one (run_gpu_aot.sh)"),
    ("cpu", "CPU backend"),
]


def main() -> None:
    for kind, title in SOURCES:
        print(table(load(kind), title))


if __name__ == "__main__":
    main()

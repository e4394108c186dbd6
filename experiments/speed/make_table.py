"""Tables and a plot from experiments/speed/runs/*.json (written by experiments/speed/run.sh).

    python experiments/speed/make_table.py            # prints the markdown tables, writes ratios.png

Train step: one row per (model, task, method) with both sides' median step time and the ratio
peftjax / peft (below 1: peftjax is faster). Decoding: tokens/s of both sides per setting and the
ratio peftjax / transformers (above 1: peftjax is faster).
"""

from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load() -> tuple[list[dict], list[dict], list[dict]]:
    steps, decoding, scans = [], [], []
    for path in sorted(glob.glob(os.path.join(HERE, "runs", "*.json"))):
        with open(path) as f:
            data = json.load(f)
        name = os.path.basename(path)
        if isinstance(data, list):   # scripts/bench.py rows (the layer-scan runs)
            scans += [{"file": name, **row} for row in data]
        elif "settings" in data:
            for row in data["settings"]:
                decoding.append({"file": name, "model": data["model"], **row})
        else:
            for row in data["methods"]:
                steps.append({"file": name, "model": data["model"], "head": data.get("head", "classification"),
                              "batch": data["batch"], "seq": data["seq"], "loadavg": data.get("loadavg"), **row})
    return steps, decoding, scans


def stalled(times: list[float] | None, factor: float = 1.5) -> str:
    """``k/n``: the timed steps that took over ``factor`` × the fastest. This machine stalls now
    and then for 2-4 s (seen in every kind of run; not the step's own work), and a median of 5
    steps with 3 stalled ones is a stall, not a step time: such rows are reruns, not figures."""
    if not times:
        return "–"
    fastest = min(times)
    return f"{sum(t > factor * fastest for t in times)}/{len(times)}"


def _mib(value) -> str:
    return f"{value / 2**20:,.0f}" if value else "–"


def tables(steps: list[dict], decoding: list[dict], scans: list[dict] = ()) -> str:
    lines = ["| model | task | batch × seq | method | peftjax s/step | peft s/step | ratio | compile s | XLA peak MiB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in steps:
        compile_s = r.get("peftjax_compile_s")
        lines.append(f"| {r['model']} | {r['head']} | {r['batch']} × {r['seq']} | {r['method']} | "
                     f"{r['peftjax_step_s']:.3f} | {r['peft_step_s']:.3f} | {r['ratio']:.2f} | "
                     f"{'–' if compile_s is None else f'{compile_s:.1f}'} | {_mib(r.get('peak_memory_bytes'))} |")
    if scans:
        lines += ["", "| model | layers | method | stack | compile s | s/step | stalled steps | XLA peak MiB |",
                  "|---|---:|---|---|---:|---:|---:|---:|"]
        for r in sorted(scans, key=lambda r: (r["model"], r.get("num_layers", 0), r["method"],
                                              r.get("scan_layers", False))):
            lines.append(f"| {r['model']} | {r.get('num_layers', '')} | {r['method']} | "
                         f"{'scanned' if r.get('scan_layers') else 'unrolled'} | "
                         f"{r['compile_s']:.2f} | {r['train_step_s']:.3f} | {stalled(r.get('train_step_s_all'))} | "
                         f"{_mib(r.get('peak_memory_bytes'))} |")
    by_model: dict = {}
    for r in steps:
        by_model.setdefault((r["model"], r["head"]), {})[r["method"]] = r["peftjax_step_s"]
    dora = [f"{m} ({h}): {v['dora'] / v['lora']:.2f}" for (m, h), v in by_model.items()
            if "dora" in v and "lora" in v]
    if dora:
        lines += ["", "DoRA / LoRA step time (peftjax): " + "; ".join(dora)]
    if decoding:
        lines += ["", "| model | setting | peftjax tokens/s | transformers tokens/s | ratio | compile s | agreement |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in decoding:
            lines.append(f"| {r['model']} | {r['setting']} | {r['peftjax_tokens_per_s']:.1f} | "
                         f"{r['transformers_tokens_per_s']:.1f} | {r['ratio']:.2f} | {r['compile_s']:.1f} | "
                         f"{r['agreement']:.3f} |")
    return "\n".join(lines)


def plot(steps: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"all-MiniLM-L6-v2": "MiniLM", "bench-llama-small": "Llama-small", "bench-t5-small": "T5-small",
             "gpt2": "GPT-2"}
    labels = [f"{short.get(r['model'], r['model'])} {r['method']}" for r in steps]
    ratios = [r["ratio"] for r in steps]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(steps)), 4.5))
    ax.bar(range(len(steps)), ratios, color=["tab:green" if x <= 0.9 else "tab:orange" if x <= 1 else "tab:red"
                                             for x in ratios])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.9, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(steps)), labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("peftjax / peft step time")
    ax.set_title("Train step vs transformers + peft, 2 CPU cores (below 1: peftjax faster; dashed: 0.9)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    steps, decoding, scans = load()
    print(tables(steps, decoding, scans))
    if steps:
        plot(steps, os.path.join(HERE, "ratios.png"))


if __name__ == "__main__":
    main()

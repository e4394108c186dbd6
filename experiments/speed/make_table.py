"""Tables and a plot from experiments/speed/runs/<host>/*.json (written by experiments/speed/run.sh).

    python experiments/speed/make_table.py            # prints the markdown tables, writes ratios.png

Runs are kept per kind of machine (``runs/<host>/``, the folder named by ``peftjax.host.label``):
a ratio holds for the CPU it was measured on, and the machines this project is lent differ (the
README's two hosts). Per host, train step: one row per (model, task, method) with both sides'
median step time, the ratio peftjax / peft (below 1: peftjax is faster) and the GFLOP/s of
peftjax's step (XLA's cost analysis over the median time). Decoding: tokens/s of both sides per
setting and the ratio peftjax / transformers (above 1: peftjax is faster).
"""

from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")


def hosts(runs: str = RUNS) -> list[str]:
    """The host folders under ``runs``, in name order."""
    return sorted(d for d in os.listdir(runs) if os.path.isdir(os.path.join(runs, d)))


def load(folder: str) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """One host's runs: train-step rows, decoding rows, layer-scan rows, and the host descriptions
    its runs recorded (``peftjax.host.describe``, one per run; none for runs from before it)."""
    steps, decoding, scans, machines = [], [], [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        name = os.path.basename(path)
        if isinstance(data, list):   # scripts/bench.py rows (the layer-scan runs)
            scans += [{"file": name, **row} for row in data]
            machines += [row["host"] for row in data[:1] if row.get("host")]
            continue
        machines += [data["host"]] if data.get("host") else []
        if "settings" in data:
            for row in data["settings"]:
                decoding.append({"file": name, "model": data["model"], **row})
        else:
            for row in data["methods"]:
                steps.append({"file": name, "model": data["model"], "head": data.get("head", "classification"),
                              "batch": data["batch"], "seq": data["seq"], "loadavg": data.get("loadavg"), **row})
    return steps, decoding, scans, machines


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}"


def describe_host(name: str, machines: list[dict], steps: list[dict]) -> str:
    """One line: the CPU, its matmul rates (the range over the runs: each run measures them once,
    before its methods), and the range of GFLOP/s its train steps reached."""
    rates = [r["flops"] / r["peftjax_step_s"] / 1e9 for r in steps if r.get("flops")]
    reached = f"peftjax's train steps {_span(rates)} GFLOP/s" if rates else ""
    if not machines:
        return f"**{name}**: CPU not recorded (runs from before `peftjax.host`); " + reached
    cpu = machines[0]["cpu"]
    isa = ", ".join(cpu.get("isa") or []) or "unknown ISA"
    parts = [f"**{name}**: {cpu['model_name']} (vendor {cpu.get('vendor')}, family {cpu.get('family')} "
             f"model {cpu.get('model')}; {isa}), {cpu['cpus']} CPUs"]
    xla = [m["xla_matmul_gflops"] for m in machines if m.get("xla_matmul_gflops")]
    torch = [m["torch_matmul_gflops"] for m in machines if m.get("torch_matmul_gflops")]
    if xla:
        parts.append(f"2048² fp32 matmul, {len(xla)} runs: XLA {_span(xla)} GFLOP/s"
                     + (f", PyTorch {_span(torch)}" if torch else ""))
    return "; ".join(parts + ([reached] if reached else []))


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
    lines = []
    if steps:
        lines += ["| model | task | batch × seq | method | peftjax s/step | peft s/step | ratio | stalled steps | peftjax GFLOP/s | compile s | XLA peak MiB |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in steps:
        compile_s = r.get("peftjax_compile_s")
        rate = f"{r['flops'] / r['peftjax_step_s'] / 1e9:.0f}" if r.get("flops") else "–"
        stalls = f"{stalled(r.get('peftjax_step_s_all'))} · {stalled(r.get('peft_step_s_all'))}"
        lines.append(f"| {r['model']} | {r['head']} | {r['batch']} × {r['seq']} | {r['method']} | "
                     f"{r['peftjax_step_s']:.3f} | {r['peft_step_s']:.3f} | {r['ratio']:.2f} | {stalls} | {rate} | "
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


def plot(by_host: dict[str, list[dict]], path: str) -> None:
    """One panel of step ratios per host, the same x positions for the same (model, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"all-MiniLM-L6-v2": "MiniLM", "bench-llama-small": "Llama-small", "bench-t5-small": "T5-small",
             "gpt2": "GPT-2"}
    keys = list(dict.fromkeys((r["model"], r["method"]) for steps in by_host.values() for r in steps))
    fig, axes = plt.subplots(len(by_host), 1, figsize=(max(6, 0.3 * len(keys)), 2.6 * len(by_host) + 1.2),
                             sharex=True, sharey=True, squeeze=False)
    for ax, (name, steps) in zip(axes[:, 0], by_host.items()):
        ratio = {(r["model"], r["method"]): r["ratio"] for r in steps}
        xs = [i for i, k in enumerate(keys) if k in ratio]
        ys = [ratio[keys[i]] for i in xs]
        ax.bar(xs, ys, color=["tab:green" if y <= 0.9 else "tab:orange" if y <= 1 else "tab:red" for y in ys])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(0.9, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("peftjax / peft")
        ax.set_title(name, fontsize=8)
    axes[-1, 0].set_xticks(range(len(keys)), [f"{short.get(m, m)} {meth}" for m, meth in keys],
                           fontsize=7, rotation=60, ha="right")
    fig.suptitle("Train step vs transformers + peft, 2 CPU cores, per host "
                 "(below 1: peftjax faster; dashed: 0.9)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    by_host = {}
    for name in hosts():
        steps, decoding, scans, machines = load(os.path.join(RUNS, name))
        print(f"## {name}\n\n{describe_host(name, machines, steps)}\n\n{tables(steps, decoding, scans)}\n")
        if steps:
            by_host[name] = steps
    if by_host:
        plot(by_host, os.path.join(HERE, "ratios.png"))


if __name__ == "__main__":
    main()

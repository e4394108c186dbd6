"""Plots for reports (matplotlib, Agg backend: no display needed). Each writes PNG and PDF."""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from peftjax.files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: str) -> list[str]:
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = f"{stem}.{ext}"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150, bbox_inches="tight"))
        paths.append(path)
    return paths


def split_site(site: str) -> tuple[int, str]:
    """(layer index, module name within the layer) of a site path like
    ``bert.encoder.layer.3.attention.self.query`` → (3, ``attention.self.query``)."""
    m = re.search(r"\.(\d+)\.(.+)$", site)
    if not m:
        raise ValueError(f"site {site!r} has no layer index")
    return int(m.group(1)), m.group(2)


def rank_allocation_heatmap(ranks: Mapping[str, int], stem: str, title: str = "") -> list[str]:
    """AdaLoRA's final rank per (layer, module) as a heat map: rows are layers, columns modules.

    This is the figure of Zhang et al. 2023 (Fig. 1/5): where the budget went.
    """
    plt = _pyplot()
    cells = {split_site(s): r for s, r in ranks.items()}
    layers = sorted({layer for layer, _ in cells})
    modules = sorted({mod for _, mod in cells})
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, mod), r in cells.items():
        grid[layers.index(layer), modules.index(mod)] = r
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(modules), 0.9 + 0.45 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
    for i in range(len(layers)):
        for j in range(len(modules)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center",
                        color="white" if grid[i, j] < np.nanmax(grid) / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(modules)), modules, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title or f"AdaLoRA rank allocation (total {int(np.nansum(grid))})", fontsize=9)
    fig.colorbar(im, ax=ax, label="final rank")
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated under (fewer params, higher score), by increasing x.

    A point is on the front when no other point has at most its parameters and a higher score
    (ties in x keep the best score only).
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def score_vs_params(points: list[dict], stem: str, *, ylabel: str, title: str = "",
                    higher_is_better: bool = True) -> list[str]:
    """Score (mean ± std over seeds) against trainable parameters, log x, with the Pareto front
    (for a loss, ``higher_is_better=False``: the front minimises it).

    ``points``: dicts with ``label``, ``params``, ``mean``, ``std``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [max(p["params"], 1) for p in points]
    ys = [p["mean"] for p in points]
    ax.errorbar(xs, ys, yerr=[p["std"] for p in points], fmt="o", ms=5, capsize=3, color="tab:blue",
                ecolor="0.6", zorder=3)
    for x, y, p in zip(xs, ys, points):
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    sign = 1.0 if higher_is_better else -1.0
    front = pareto_front([(x, sign * y) for x, y in zip(xs, ys)])
    fx, fy = [xs[i] for i in front], [ys[i] for i in front]
    ax.step(fx, fy, where="post", color="tab:red", lw=1.2, label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


def grouped_bars(labels: list[str], series: dict[str, list[float | None]], stem: str, *,
                 ylabel: str, title: str = "", log: bool = False) -> list[str]:
    """One bar per label for each series (e.g. per method, one bar per task)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(labels) * max(1, len(series)) + 1.5), 3.8))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for k, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else v for v in values]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


def curves(series: dict[str, tuple[list[float], list[float], list[float]]], stem: str, *,
           xlabel: str, ylabel: str, title: str = "", logx: bool = False) -> list[str]:
    """Lines with a ±std band: ``series[label] = (x, mean, std)`` (learning curves, ablations)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, mean, std) in series.items():
        x, mean, std = (np.asarray(v, float) for v in (x, mean, std))
        (line,) = ax.plot(x, mean, marker="o" if len(x) <= 12 else None, ms=3, lw=1.2, label=label)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(series) > 8 else 1)
    paths = _save(fig, stem)
    plt.close(fig)
    return paths

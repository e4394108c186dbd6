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


def _axis_break(ys: list[float]) -> tuple[float, float] | None:
    """``(below, above)``: the scores on either side of the widest gap between sorted scores,
    when that gap is over half their range, else None.

    Why: a class-prior baseline 40 points below the methods would squeeze every method into a
    sliver at the top of one axis, where neither their differences nor their labels can be
    read; the plot then breaks its score axis in that gap."""
    s = sorted(y for y in ys if np.isfinite(y))
    if len(s) < 3:
        return None
    gap, i = max((s[k + 1] - s[k], k) for k in range(len(s) - 1))
    return (s[i], s[i + 1]) if gap > 0.5 * (s[-1] - s[0]) else None


def _place_labels(ax, xs: list[float], ys: list[float], labels: list[str], fontsize: float = 7) -> None:
    """Labels the points inside ``ax``'s limits without overlaps: each label, from the top
    point down, takes the first free spot (in display space) among offsets that move out from
    its point, right side before left at each distance; a thin leader line joins a label placed
    away from its point. The limits must be final."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    ylo, yhi = sorted(ax.get_ylim())
    inside = [(x, y, t) for x, y, t in zip(xs, ys, labels) if ylo <= y <= yhi]
    px = ax.transData.transform([(x, y) for x, y, _ in inside]) if inside else []
    taken = [Bbox.from_extents(u - 4, v - 4, u + 4, v + 4) for u, v in px]   # the markers
    step = 1.25 * fontsize
    offsets = [(5, 2), (5, -2 - step)]
    for k in range(1, 25):
        offsets += [(10, k * step), (10, -k * step - step)]
    candidates = [c for dx, dy in offsets for c in ((dx, dy, "left"), (-dx, dy, "right"))]
    for (x, y, text), own in sorted(zip(inside, range(len(inside))), key=lambda t: -t[0][1]):
        chosen = None
        for dx, dy, ha in candidates:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                              fontsize=fontsize, ha=ha, va="bottom")
            box = ann.get_window_extent(renderer).padded(1)
            ann.remove()
            fits = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0
                    and box.y1 <= frame.y1)
            if fits and not any(box.overlaps(b) for j, b in enumerate(taken) if j != own):
                chosen = (dx, dy, ha, box)
                break
        if chosen is None:   # nowhere free: the nearest spot, overlapping
            dx, dy, ha = candidates[0]
        else:
            dx, dy, ha, box = chosen
            taken.append(box)
        far = abs(dy) > step + 2   # beyond the two spots beside the point
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha=ha, va="bottom",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.55", shrinkA=0, shrinkB=3)
                    if far else None)


def score_vs_params(points: list[dict], stem: str, *, ylabel: str, title: str = "",
                    higher_is_better: bool = True) -> list[str]:
    """Score (mean ± std over seeds) against trainable parameters, log x, with the Pareto front
    (for a loss, ``higher_is_better=False``: the front minimises it). Labels never overlap
    (:func:`_place_labels`), and a score axis with one gap wider than half its range is broken
    there (:func:`_axis_break`), the panel of the larger group on top.

    ``points``: dicts with ``label``, ``params``, ``mean``, ``std``.
    """
    plt = _pyplot()
    xs = [max(p["params"], 1) for p in points]
    ys = [p["mean"] for p in points]
    err = [p["std"] for p in points]
    cut = _axis_break(ys)
    if cut is None:
        fig, ax = plt.subplots(figsize=(7.2, 5.0))
        panels = [ax]
    else:
        above = sum(y >= cut[1] for y in ys)
        ratios = [3, 1] if above >= len(ys) - above else [1, 3]
        fig, panels = plt.subplots(2, 1, sharex=True, figsize=(7.2, 5.6),
                                   gridspec_kw={"height_ratios": ratios, "hspace": 0.06})
    sign = 1.0 if higher_is_better else -1.0
    front = pareto_front([(x, sign * y) for x, y in zip(xs, ys)])
    fx, fy = [xs[i] for i in front], [ys[i] for i in front]
    for ax in panels:
        ax.errorbar(xs, ys, yerr=err, fmt="o", ms=5, capsize=3, color="tab:blue", ecolor="0.6",
                    zorder=3)
        ax.step(fx, fy, where="post", color="tab:red", lw=1.2, label="Pareto front", zorder=2)
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    if cut is not None:
        top, bottom = panels
        hi = max(y + e for y, e in zip(ys, err) if y >= cut[1])
        lo_top = min(y - e for y, e in zip(ys, err) if y >= cut[1])
        lo = min(y - e for y, e in zip(ys, err) if y <= cut[0])
        hi_bottom = max(y + e for y, e in zip(ys, err) if y <= cut[0])
        pad_top, pad_bottom = 0.08 * max(hi - lo_top, 1.0), max(0.15 * (hi_bottom - lo), 1.0)
        top.set_ylim(lo_top - pad_top, hi + pad_top)
        bottom.set_ylim(lo - pad_bottom, hi_bottom + pad_bottom)
        top.spines["bottom"].set_visible(False)
        bottom.spines["top"].set_visible(False)
        top.tick_params(bottom=False, which="both")
        marks = dict(marker=[(-1, -0.5), (1, 0.5)], markersize=10, linestyle="none", color="k",
                     mec="k", mew=1, clip_on=False)
        top.plot([0, 1], [0, 0], transform=top.transAxes, **marks)
        bottom.plot([0, 1], [1, 1], transform=bottom.transAxes, **marks)
        fig.supylabel(ylabel, fontsize=10)
    else:
        panels[0].set_ylabel(ylabel)
    panels[-1].set_xlabel("trainable parameters (log scale)")
    panels[0].set_title(title, fontsize=9)
    panels[-1].legend(fontsize=8, loc="lower right")
    fig.canvas.draw()
    for ax in panels:
        ax.set_xlim(ax.get_xlim())
        ax.set_ylim(ax.get_ylim())
        _place_labels(ax, xs, ys, [p["label"] for p in points])
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


def grouped_bars(labels: list[str], series: dict[str, list[float | None]], stem: str, *,
                 ylabel: str, title: str = "", log: bool = False) -> list[str]:
    """One bar per label for each series (e.g. per method, one bar per task). A label with no
    value in any series (a baseline with no step to time) gets no empty slot."""
    plt = _pyplot()
    keep = [i for i in range(len(labels)) if any(v[i] is not None for v in series.values())]
    labels = [labels[i] for i in keep]
    series = {name: [values[i] for i in keep] for name, values in series.items()}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(labels) * max(1, len(series)) + 1.5), 3.8))
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
    if len(series) > 1:   # above the axes, where no bar can be hidden behind it
        ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(series),
                  borderaxespad=0.2, frameon=False)
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


def small_multiples(panels: Mapping[str, dict], stem: str, *, xlabel: str, ylabel: str,
                    title: str = "", logx: bool = True, cols: int = 5,
                    floor: float | None = None) -> list[str]:
    """One small panel per label, on shared axes: ``panels[label] = {"x": [...], "y": [...],
    "chosen": x or None, "note": str, "diverged": [x, ...]}`` — the chosen point ringed in red,
    the note in the corner, a value whose run diverged marked ✕ "NaN" at the bottom. Why: a
    hyperparameter grid per method (learning-rate sensitivity) is read one method at a time;
    twenty lines on one axes are not.

    ``floor``: the shared y axis starts there; a point below it (a rate that diverged to the
    class prior) is drawn as a ▼ on the floor with its value, so one collapse does not flatten
    every other curve into the top of its panel."""
    plt = _pyplot()
    n = len(panels)
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 0.6, 1.9 * rows + 0.8), sharex=True,
                             sharey=True, squeeze=False)
    for ax, (label, p) in zip(axes.ravel(), panels.items()):
        xs, ys = np.asarray(p["x"], float), np.asarray(p["y"], float)
        order = np.argsort(xs)
        shown = ys if floor is None else np.maximum(ys, floor)
        ax.plot(xs[order], shown[order], marker="o", ms=3, lw=1.2, color="tab:blue")
        for x, y in zip(xs, ys):
            if floor is not None and y < floor:
                ax.plot([x], [floor], marker="v", ms=6, color="tab:blue", clip_on=False)
                ax.annotate(f"{y:.0f}", (x, floor), xytext=(4, 2), textcoords="offset points", fontsize=6)
        if p.get("chosen") is not None:
            k = int(np.argmin(np.abs(xs - p["chosen"])))
            ax.plot([xs[k]], [shown[k]], marker="o", ms=8, mfc="none", mec="tab:red", mew=1.5)
        for x in p.get("diverged", ()):   # no score: the run went NaN/inf
            y0 = floor if floor is not None else float(np.nanmin(ys))
            ax.plot([x], [y0], marker="x", ms=6, mew=1.5, color="tab:red", clip_on=False)
            ax.annotate("NaN", (x, y0), xytext=(4, 2), textcoords="offset points", fontsize=6,
                        color="tab:red")
        ax.set_title(label, fontsize=8)
        if p.get("note"):
            ax.text(0.03, 0.04, p["note"], transform=ax.transAxes, fontsize=6, color="0.35")
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    if floor is not None:
        top = max(max(p["y"]) for p in panels.values())
        axes[0, 0].set_ylim(floor - 0.04 * (top - floor), top + 0.06 * (top - floor))
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths = _save(fig, stem)
    plt.close(fig)
    return paths


_DASHES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D")


def line_style(i: int) -> dict:
    """The ``i``-th series' colour, dash and marker: tab10's ten colours, then the same colours
    dashed with another marker, so that up to 40 series stay told apart (one colour cycle
    would give two series the same line from the eleventh on)."""
    import matplotlib

    k = (i // 10) % len(_DASHES)
    return {"color": matplotlib.colormaps["tab10"](i % 10), "linestyle": _DASHES[k],
            "marker": _MARKERS[k]}


def curves(series: dict[str, tuple[list[float], list[float], list[float]]], stem: str, *,
           xlabel: str, ylabel: str, title: str = "", logx: bool = False,
           styles: Mapping[str, dict] | None = None) -> list[str]:
    """Lines with a ±std band: ``series[label] = (x, mean, std)`` (learning curves, ablations).
    ``styles[label]``: matplotlib line properties for that series, over :func:`line_style`'s
    (e.g. one colour for two runs of one method, dashed for the second)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, (x, mean, std)) in enumerate(series.items()):
        x, mean, std = (np.asarray(v, float) for v in (x, mean, std))
        style = line_style(i)
        if len(x) > 12:
            style["marker"] = None
        style.update((styles or {}).get(label, {}))
        (line,) = ax.plot(x, mean, ms=3, lw=1.2, label=label, **style)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) > 8:   # beside the axes: inside, a long legend hides the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)
    paths = _save(fig, stem)
    plt.close(fig)
    return paths

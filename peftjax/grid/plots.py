"""Plots for reports (matplotlib, Agg backend: no display needed). Each writes PNG and PDF."""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np


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
        tmp = f"{stem}.tmp.{ext}"
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
        os.replace(tmp, path)
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

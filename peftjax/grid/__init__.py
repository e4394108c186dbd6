"""Experiment grids: cells, a resumable results store, and reports."""

from peftjax.grid.results import ResultsStore
from peftjax.grid.report import markdown_table
from peftjax.grid.plots import rank_allocation_heatmap

__all__ = ["ResultsStore", "markdown_table", "rank_allocation_heatmap"]

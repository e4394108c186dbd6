"""Experiment grids: sweep definitions → cells, a resumable runner, results store, reports."""

from peftjax.grid.results import ResultsStore
from peftjax.grid.report import markdown_table
from peftjax.grid.plots import rank_allocation_heatmap
from peftjax.grid.sweep import Cell, GridError, expand, load_definition

__all__ = ["Cell", "GridError", "ResultsStore", "expand", "load_definition", "markdown_table",
           "rank_allocation_heatmap"]

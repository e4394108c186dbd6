"""Experiment grids: cells, a resumable results store, and reports."""

from peftjax.grid.results import ResultsStore
from peftjax.grid.report import markdown_table

__all__ = ["ResultsStore", "markdown_table"]

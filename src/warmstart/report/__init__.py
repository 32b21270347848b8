"""Reports: a self-contained HTML report of a run, and run listings and comparisons."""

from .html import build_report
from .runs import compare_runs, list_runs

__all__ = ["build_report", "compare_runs", "list_runs"]

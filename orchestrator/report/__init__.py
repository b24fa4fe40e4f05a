"""Reports of a search run: `report.html` (interactive, self-contained), `summary.md` + `front.png`, console table.

Everything is drawn from the run directory's Parquet tables, so a report can be regenerated anywhere,
even after the checkpoints have moved (their absence is noted, not fatal).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.files.fs import write_atomic
from orchestrator.report._compare import fmt_speed
from orchestrator.report._data import SENSITIVITY_FILE, load_run
from orchestrator.report._html import render_html
from orchestrator.report._png import front_png
from orchestrator.report._summary import summary_markdown
from orchestrator.report._table import format_front_table

__all__ = [
    "HTML_FILE",
    "PNG_FILE",
    "SENSITIVITY_FILE",
    "SUMMARY_FILE",
    "ReportPaths",
    "fmt_speed",
    "format_front_table",
    "write_report",
]

HTML_FILE = "report.html"
SUMMARY_FILE = "summary.md"
PNG_FILE = "front.png"


@dataclass(frozen=True)
class ReportPaths:
    """Where the report files were written (local paths or URIs, like the run directory)."""

    html: str
    summary: str
    png: str


def write_report(run_dir: str) -> ReportPaths:
    """Write report.html, summary.md and front.png into `run_dir` (each atomically); raise ResultsError if
    the run has no readable trials table or no finished trial."""
    run = load_run(run_dir)
    png = write_atomic(run_dir, PNG_FILE, front_png(run))
    summary = write_atomic(run_dir, SUMMARY_FILE, summary_markdown(run, PNG_FILE).encode())
    html = write_atomic(run_dir, HTML_FILE, render_html(run).encode())
    return ReportPaths(html=html, summary=summary, png=png)

"""`summary.md`: a few run facts, the front as a Markdown table and the PNG, for issues and pull requests."""

from __future__ import annotations

from orchestrator.report._data import RunData
from orchestrator.report._format import run_facts
from orchestrator.report._table import front_table, render_markdown

_FACTS = ("objectives", "constraint", "trials", "wall time", "device")


def summary_markdown(run: RunData, png_name: str) -> str:
    """The Markdown text; `png_name` is the image's path relative to the summary."""
    facts = dict(run_facts(run.run_info, run.trials))
    lines = [
        f"## Pareto front — {facts['workload']}",
        "",
        *[f"- **{label}**: {facts[label]}" for label in _FACTS],
        *[f"- **warning**: {warning}" for warning in run.warnings],
        "",
        render_markdown(front_table(run.front, run.run_info, run.notes, run.trials)),
        "",
        f"![Pareto front: validation {run.metric} versus size and latency]({png_name})",
        "",
    ]
    return "\n".join(lines)

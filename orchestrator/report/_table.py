"""The Pareto front as one table model, rendered as plain text (console) and Markdown; HTML uses the model.

The baseline heads the table so every ratio has its reference in view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.report._format import (
    fmt_bytes,
    fmt_count,
    fmt_metric,
    fmt_ms,
    fmt_ratio,
    fmt_techniques,
    ratio,
)


@dataclass(frozen=True)
class Cell:
    """What a reader sees (`text`), the exact number behind it (`value`), and a warning (`note`)."""

    text: str
    value: Any = None
    numeric: bool = False
    note: str = ""


@dataclass(frozen=True)
class FrontTable:
    headers: list[str]
    rows: list[list[Cell]]
    trial_ids: list[str]

    @property
    def numeric(self) -> list[bool]:
        """Which columns hold numbers (right-aligned everywhere)."""
        return [any(row[i].numeric for row in self.rows) for i in range(len(self.headers))]


def sort_front(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Smallest model first; unknown sizes last; ties by better validation."""
    return sorted(
        rows,
        key=lambda r: (r.get("size_bytes") is None, r.get("size_bytes") or 0, -(r.get("validation") or 0.0)),
    )


def _row(trial_id: str, row: Mapping[str, Any], base: Mapping[str, Any], checkpoint: Cell) -> list[Cell]:
    size, latency, flops = row.get("size_bytes"), row.get("latency_ms"), row.get("flops")
    compression = row.get("compression_ratio") or ratio(base.get("size_bytes"), size)
    speedup = row.get("speedup") or ratio(base.get("latency_ms"), latency)
    return [
        Cell(trial_id),
        Cell(fmt_metric(row.get("test")), row.get("test"), True),
        Cell(fmt_metric(row.get("validation")), row.get("validation"), True),
        Cell(fmt_bytes(size), size, True),
        Cell(fmt_ratio(compression), compression, True),
        Cell(fmt_ms(latency), latency, True),
        Cell(fmt_ratio(speedup), speedup, True),
        Cell(fmt_count(flops), flops, True),
        Cell(fmt_techniques(row.get("techniques"))),
        checkpoint,
    ]


def front_table(
    front: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any], notes: Mapping[str, str] | None = None
) -> FrontTable:
    """Table model of the front (sorted by size) under a baseline row; `notes` maps trial id → checkpoint note."""
    metric = run_info.get("metric") or "metric"
    headers = [
        "trial",
        f"test {metric}",
        f"validation {metric}",
        "size",
        "compression",
        "latency",
        "speedup",
        "FLOPs",
        "techniques",
        "checkpoint",
    ]
    base = run_info.get("baseline") or {}
    rows, ids = [], []
    if base:
        rows.append(_row("baseline", {**base, "techniques": "none (uncompressed)"}, base, Cell("")))
        ids.append("baseline")
    for row in sort_front(front):
        trial_id = str(row.get("trial_id"))
        path = row.get("checkpoint") or ""
        note = (notes or {}).get(trial_id, "") if path else "no checkpoint recorded"
        rows.append(_row(trial_id, row, base, Cell(path or "—", path or None, note=note)))
        ids.append(trial_id)
    return FrontTable(headers, rows, ids)


def _plain(cell: Cell) -> str:
    return f"{cell.text} ({cell.note})" if cell.note else cell.text


def render_text(table: FrontTable) -> str:
    """Aligned columns for a terminal: numbers right-aligned, text left-aligned, a rule under the header."""
    cells = [table.headers, *[[_plain(c) for c in row] for row in table.rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(table.headers))]
    numeric = table.numeric
    lines = [
        "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(line, widths, numeric, strict=True)).rstrip()
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown_cell(cell: Cell) -> str:
    body = f"`{cell.text}`" if cell.value is not None and not cell.numeric else cell.text
    body = body.replace("|", "\\|")
    return f"{body} **({cell.note})**" if cell.note else body


def render_markdown(table: FrontTable) -> str:
    """A GitHub-flavoured Markdown table with right-aligned number columns."""
    rule = ["---:" if n else ":---" for n in table.numeric]
    lines = [table.headers, rule, *[[_markdown_cell(c) for c in row] for row in table.rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def format_front_table(
    rows: Sequence[Mapping[str, Any]], run_info: Mapping[str, Any], *, notes: Mapping[str, str] | None = None
) -> str:
    """The Pareto front (rows of pareto.parquet) as an aligned plain-text table, for the console."""
    return render_text(front_table(rows, run_info, notes))

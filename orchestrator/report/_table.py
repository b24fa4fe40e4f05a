"""The Pareto front as one table model, rendered as plain text (console) and Markdown; HTML uses the model.

The baseline heads the table so every ratio has its reference in view; the reference policies follow
(labelled by name), then the front, smallest model first. A role column says which is which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.report._compare import change, fmt_change, fmt_speed, speed_spread
from orchestrator.report._format import (
    fmt_bytes,
    fmt_count,
    fmt_metric,
    fmt_ms,
    fmt_ratio,
    fmt_techniques,
    metric_direction,
    ratio,
)
from orchestrator.report._policy import policy_name

NOT_APPLICABLE = "—"  # a comparison of the baseline with itself


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
    kinds: list[str]  # per row: "baseline", "reference" or "front"

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


def _headers(metric: str) -> list[str]:
    return [
        "trial",
        f"test {metric}",
        f"validation {metric}",
        "size",
        "Δ test",
        "Δ validation",
        "compression",
        "latency",
        "speed",
        "FLOPs",
        "techniques",
        "role",
        "checkpoint",
    ]


def _comparisons(row: Mapping[str, Any], base: Mapping[str, Any], direction: str) -> list[Cell]:
    """Δ test, Δ validation (points, or % of a minimised metric), compression, then latency and speed, all
    against the baseline."""
    compression = row.get("compression_ratio") or ratio(base.get("size_bytes"), row.get("size_bytes"))
    speedup = row.get("speedup") or ratio(base.get("latency_ms"), row.get("latency_ms"))
    test, validation = (change(row.get(k), base.get(k)) for k in ("test", "validation"))
    return [
        Cell(fmt_change(row.get("test"), base.get("test"), direction), test, True),
        Cell(fmt_change(row.get("validation"), base.get("validation"), direction), validation, True),
        Cell(fmt_ratio(compression), compression, True),
        Cell(fmt_ms(row.get("latency_ms")), row.get("latency_ms"), True),
        Cell(fmt_speed(speedup, speed_spread(row, base)), speedup, True),
    ]


def _row(
    label: str, row: Mapping[str, Any], base: Mapping[str, Any], role: str, checkpoint: Cell, direction: str
) -> list[Cell]:
    size, flops = row.get("size_bytes"), row.get("flops")
    if base is row:  # the baseline: nothing to compare with but itself
        same = Cell(NOT_APPLICABLE, numeric=True)
        latency = Cell(fmt_ms(row.get("latency_ms")), row.get("latency_ms"), True)
        comparisons = [same, same, same, latency, same]
    else:
        comparisons = _comparisons(row, base, direction)
    return [
        Cell(label),
        Cell(fmt_metric(row.get("test")), row.get("test"), True),
        Cell(fmt_metric(row.get("validation")), row.get("validation"), True),
        Cell(fmt_bytes(size), size, True),
        *comparisons,
        Cell(fmt_count(flops), flops, True),
        Cell(fmt_techniques(row.get("techniques"))),
        Cell(role),
        checkpoint,
    ]


def _role(row: Mapping[str, Any], on_front: bool) -> str:
    """The role column: reference, reference · infeasible, Pareto, Pareto · reference (uniform int8), ..."""
    kind, name = row.get("role"), policy_name(row.get("policy_json"))
    if on_front:
        own = {"baseline": " · baseline", "reference": f" · reference ({name})" if name else " · reference"}
        return "Pareto" + own.get(str(kind), "")
    status = row.get("status")
    if status == "completed":
        return "reference" if row.get("feasible") else "reference · infeasible"
    return f"reference · {str(status).replace('_', ' ')}"


def _references(trials: Sequence[Mapping[str, Any]], front_ids: set[str]) -> list[Mapping[str, Any]]:
    """The reference trials that are not on the front (those are listed there), smallest first."""
    return sort_front([t for t in trials if t.get("role") == "reference" and str(t.get("trial_id")) not in front_ids])


def front_table(
    front: Sequence[Mapping[str, Any]],
    run_info: Mapping[str, Any],
    notes: Mapping[str, str] | None = None,
    trials: Sequence[Mapping[str, Any]] = (),
) -> FrontTable:
    """Table model: the baseline, the references among `trials` (by name), then the front sorted by size;
    `notes` maps trial id → checkpoint note."""
    base, direction = run_info.get("baseline") or {}, metric_direction(run_info)
    rows, ids, kinds = [], [], []
    if base:
        plain = {**base, "techniques": "none (uncompressed)"}
        rows.append(_row("baseline", plain, plain, "baseline", Cell(NOT_APPLICABLE), direction))
        ids.append("baseline")
        kinds.append("baseline")
    front_ids = {str(r.get("trial_id")) for r in front}
    for row in _references(trials, front_ids):
        trial_id = str(row.get("trial_id"))
        label = policy_name(row.get("policy_json")) or trial_id
        rows.append(_row(label, row, base, _role(row, False), Cell(NOT_APPLICABLE), direction))
        ids.append(trial_id)
        kinds.append("reference")
    for row in sort_front(front):
        trial_id = str(row.get("trial_id"))
        path = row.get("checkpoint") or ""
        note = (notes or {}).get(trial_id, "") if path else "no checkpoint recorded"
        checkpoint = Cell(path or "—", path or None, note=note)
        rows.append(_row(trial_id, row, base, _role(row, True), checkpoint, direction))
        ids.append(trial_id)
        kinds.append("front")
    return FrontTable(_headers(run_info.get("metric") or "metric"), rows, ids, kinds)


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
    rows: Sequence[Mapping[str, Any]],
    run_info: Mapping[str, Any],
    *,
    notes: Mapping[str, str] | None = None,
    trials: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The Pareto front (rows of pareto.parquet) as an aligned plain-text table, for the console; pass the
    run's `trials` (rows of trials.parquet) to list the reference policies too."""
    return render_text(front_table(rows, run_info, notes, trials))

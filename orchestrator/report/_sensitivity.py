"""The sensitivity heat map: layer groups × settings, coloured by the metric's drop with that setting alone.

Drawn from `sensitivity.parquet` (the search's `prior` writes it): one row per cell with its technique, setting,
group, value, metric, drop, output error and change of bytes, and whether the search still proposed it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from orchestrator.report._format import fmt_bytes

FAILED = "failed"
REMOVED_MARK = "✕"


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """`setting value` column labels in the table's order (each technique's values as it declares them)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(column(row))
    return list(seen)


def column(row: Mapping[str, Any]) -> str:
    return f"{row.get('setting')} {row.get('value')}"


def _text(row: Mapping[str, Any]) -> str:
    drop = row.get("drop")
    if drop is None:
        return FAILED
    return f"{REMOVED_MARK} {drop:.3g}" if row.get("proposed") is False else f"{drop:.3g}"


def _hover(row: Mapping[str, Any], metric: str) -> str:
    if row.get("drop") is None:
        return f"{row.get('technique')} {column(row)} on {row.get('group')}: failed ({row.get('failure')})"
    lines = [
        f"{row.get('technique')}: {column(row)}",
        f"group {row.get('group')} ({row.get('layers')})",
        f"{metric} {row['metric']:.4g} (drop {row['drop']:.3g})",
        f"output error {row.get('output_error') or 0:.3g}",
        f"stored bytes {fmt_bytes(row.get('size_bytes'))} ({_signed(row.get('delta_bytes'))})",
    ]
    if row.get("proposed") is False:
        lines.append("not proposed: beyond the accuracy guard alone")
    return "<br>".join(lines)


def _signed(delta: Any) -> str:
    if not isinstance(delta, int):
        return "n/a"
    return ("+" if delta > 0 else "−") + fmt_bytes(abs(delta))


def sensitivity_figure(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], font: dict) -> go.Figure | None:
    """The heat map of the cells `rows` (None when there are none): a cell's colour is its drop, clipped at 0."""
    if not rows:
        return None
    groups = list(dict.fromkeys(str(row.get("group")) for row in rows))
    columns = _columns(rows)
    at = {(str(row.get("group")), column(row)): row for row in rows}
    z, text, hover = [], [], []
    metric = str(info.get("metric") or "metric")
    for group in groups:
        cells = [at.get((group, c)) for c in columns]
        z.append([max(r["drop"], 0.0) if r and r.get("drop") is not None else None for r in cells])
        text.append([_text(r) if r else "" for r in cells])
        hover.append([_hover(r, metric) if r else "" for r in cells])
    drops = [v for line in z for v in line if v is not None]
    limit = info.get("max_accuracy_drop")
    top = max([*drops, 2 * limit if isinstance(limit, int | float) else 0.0, 1e-9])
    fig = go.Figure(
        go.Heatmap(
            z=z, x=columns, y=groups, text=text, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
            colorscale="OrRd", zmin=0.0, zmax=top, hoverongaps=False, xgap=2, ygap=2,
            colorbar=dict(thickness=12, outlinewidth=0, title=dict(text="drop", side="right")),
        )
    )  # fmt: skip
    fig.update_layout(
        template="plotly_white",
        font=font,
        height=170 + 30 * len(groups),
        margin=dict(l=10, r=10, t=44, b=10),
        title=dict(text=f"{metric} drop, one layer group alone", x=0.01, y=0.98, yanchor="top", font=dict(size=14)),
        xaxis=dict(type="category", tickangle=-40, showgrid=False, automargin=True),
        yaxis=dict(type="category", autorange="reversed", showgrid=False, automargin=True),
        plot_bgcolor="#F4F5F7",
    )
    return fig

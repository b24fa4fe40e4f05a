"""Interactive plotly figures: the validation metric against each cost, and per-layer heat maps of the front."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from orchestrator.report._data import RunData
from orchestrator.report._points import (
    AXES,
    FRONT_COLOUR,
    PARETO,
    Style,
    drop_limit,
    has_point,
    hover_text,
    log_scale,
    point_groups,
    point_label,
    step_line,
)
from orchestrator.report._policy import LayerTable, display, layer_settings, layer_table, numeric
from orchestrator.report._table import sort_front

FONT = dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif", size=13)
_SYMBOLS = {"circle": "circle", "x": "x", "diamond": "diamond", "star": "star"}


def _binary_ticks(low: float, high: float) -> tuple[list[float], list[str]]:
    """Tick positions at powers of two (16 KiB, 32 KiB, ...) spanning [low, high], at most about eight."""
    first, last = math.floor(math.log2(low)), math.ceil(math.log2(high))
    stride = max(1, math.ceil((last - first + 1) / 8))
    values = [2.0**p for p in range(first, last + 1, stride)]
    return values, [AXES["size_bytes"][1](v) for v in values]


def _axis(x: str, values: list[float]) -> dict:
    """x-axis settings: log scale when the values span a wide range, readable units on the ticks."""
    title, _ = AXES[x]
    axis: dict = {"title": {"text": title}, "type": "log" if log_scale(values) else "linear"}
    if x == "size_bytes" and axis["type"] == "log":
        axis["tickvals"], axis["ticktext"] = _binary_ticks(min(values), max(values))
    elif x == "size_bytes":
        axis.update(tickformat="~s", ticksuffix="B")
    elif x == "latency_ms":
        axis["ticksuffix"] = " ms"
    else:
        axis["tickformat"] = "~s"
    return axis


def _points_trace(rows: list[dict], x: str, style: Style, metric: str) -> go.Scatter:
    """One point group's markers (labelled for the baseline and references)."""
    return go.Scatter(
        x=[r[x] for r in rows],
        y=[r["validation"] for r in rows],
        name=f"{style.name} ({len(rows)})",
        legendgroup="front" if style is PARETO else style.name,
        mode="markers+text" if style.labelled else "markers",
        text=[point_label(r) for r in rows] if style.labelled else None,
        textposition="top center",
        textfont=dict(color=style.colour, size=11),
        hovertext=[hover_text(r, metric) for r in rows],
        hoverinfo="text",
        marker=dict(
            symbol=_SYMBOLS[style.marker] + ("-open" if style.hollow else ""),
            color=style.colour,
            size=style.size,
            opacity=style.opacity,
            line=dict(width=1.5 if style.hollow else 1, color=style.colour if style.hollow else "white"),
        ),
    )


def _front_line(rows: list[dict], x: str) -> go.Scatter:
    line_x, line_y = step_line(rows, x)
    return go.Scatter(
        x=line_x,
        y=line_y,
        mode="lines",
        line=dict(color=FRONT_COLOUR, width=2, shape="hv"),
        legendgroup="front",
        showlegend=False,
        hoverinfo="skip",
    )


def front_figure(run: RunData, x: str) -> go.Figure:
    """Validation metric versus `x`: all trials faint, the front as a step line, baseline and references labelled."""
    fig = go.Figure()
    xs: list[float] = []
    for group in point_groups(run):
        rows = [r for r in group.rows if has_point(r, x)]
        if not rows:
            continue
        xs += [r[x] for r in rows]
        if group.style is PARETO:
            fig.add_trace(_front_line(rows, x))
        fig.add_trace(_points_trace(rows, x, group.style, run.metric))
    limit = drop_limit(run.run_info)
    if limit is not None:
        fig.add_hline(
            y=limit,
            line=dict(color="#7F7F7F", dash="dot", width=1),
            annotation_text="accuracy-drop limit",
            annotation_position="bottom right",
            annotation_font=dict(color="#7F7F7F", size=11),
        )
    fig.update_layout(
        template="plotly_white",
        font=FONT,
        height=460,
        margin=dict(l=60, r=20, t=50, b=50),
        title=dict(text=f"{run.metric} vs {AXES[x][0]}", x=0.01, font=dict(size=15)),
        xaxis=_axis(x, xs),
        yaxis=dict(title=dict(text=f"validation {run.metric}")),
        legend=dict(orientation="h", yanchor="top", y=-0.16, x=0, font=dict(size=11)),
        hoverlabel=dict(align="left", font=dict(size=12)),
    )
    return fig


# Settings where a larger value compresses more; their colour scale is reversed so darker always means smaller.
_LARGER_COMPRESSES = {"unstructured sparsity", "structured pruning ratio"}


def _comparable(z: list[list[float | None]]) -> list[list[float | None]]:
    """Drop colour from absolute values (> 1) that share a map with fractions (ranks given both ways): one
    colour scale cannot say both "rank 16" and "keep 25 %". Their cells keep the text."""
    values = [v for row in z for v in row if v is not None]
    if not (any(v > 1 for v in values) and any(v <= 1 for v in values)):
        return z
    return [[v if v is not None and v <= 1 else None for v in row] for row in z]


def _colour_range(z: list[list[float | None]]) -> tuple[float, float]:
    """[0, 1] for fractions, else the values' span (widened when all values are equal)."""
    values = [v for row in z for v in row if v is not None] or [0.0, 1.0]
    low, high = min(values), max(values)
    if low >= 0 and high <= 1:
        return 0.0, 1.0
    return (low - 1, high + 1) if low == high else (low, high)


def heatmap_figure(table: LayerTable, trial_ids: list[str]) -> go.Figure:
    """One heat map: rows are Pareto trials, columns layer keys, colour the numeric value, text as written."""
    z = _comparable([[numeric(v) if v is not None else None for v in row] for row in table.values])
    zmin, zmax = _colour_range(z)
    text = [["" if v is None else display(v) for v in row] for row in table.values]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=table.columns,
            y=trial_ids,
            text=text,
            texttemplate="%{text}",
            colorscale="Cividis",
            reversescale=table.title in _LARGER_COMPRESSES,
            zmin=zmin,
            zmax=zmax,
            hoverongaps=False,
            hovertemplate="trial %{y}<br>layer %{x}<br>" + table.title + ": %{text}<extra></extra>",
            xgap=2,
            ygap=2,
            colorbar=dict(thickness=12, outlinewidth=0),
        )
    )
    fig.update_layout(
        template="plotly_white",
        font=FONT,
        height=150 + 32 * len(trial_ids),
        margin=dict(l=10, r=10, t=44, b=10),
        title=dict(text=table.title, x=0.01, y=0.98, yanchor="top", font=dict(size=14)),
        xaxis=dict(type="category", tickangle=-30 if len(table.columns) > 6 else 0, showgrid=False, automargin=True),
        yaxis=dict(type="category", autorange="reversed", showgrid=False, automargin=True),
        plot_bgcolor="#F4F5F7",
    )
    return fig


def heatmaps(run: RunData) -> list[tuple[str, go.Figure | None]]:
    """(title, figure) per per-layer setting; None where no Pareto policy sets it."""
    front = sort_front(run.front)
    ids = [str(r.get("trial_id")) for r in front]
    policies = [r.get("policy_json") for r in front]
    tables = [layer_table(title, policies) for title in layer_settings()]
    return [(t.title, heatmap_figure(t, ids) if t.columns else None) for t in tables]

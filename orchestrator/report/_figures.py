"""Interactive plotly figures: the validation metric against each cost, and per-layer heat maps of the front."""

from __future__ import annotations

import html
import math
from dataclasses import replace

import plotly.graph_objects as go

from orchestrator.report._data import RunData
from orchestrator.report._labels import Box, Frame, place
from orchestrator.report._points import (
    AXES,
    FRONT_COLOUR,
    PARETO,
    Limits,
    Style,
    drop_limit,
    has_point,
    hover_text,
    labelled_points,
    plot_limits,
    point_groups,
    step_line,
    unlabelled_points,
)
from orchestrator.report._policy import LayerTable, display, layer_settings, layer_table, numeric
from orchestrator.report._scale import fraction, size_ticks
from orchestrator.report._table import sort_front

FONT = dict(family="system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif", size=13)
_SYMBOLS = {"circle": "circle", "x": "x", "diamond": "diamond", "star": "star"}
# The plot area's size in pixels as the page may show it: the figures follow the window's width (two per row
# from 1100 pixels, else one), and the legend below takes one to three rows of the fixed height. Measured in
# Chromium: 502 × 268 at a 1280-pixel window, 746 × 293 at 900, 346 × 243 at 400.
PLOT_AREA = Frame(width=(260.0, 1000.0), height=(230.0, 330.0))
TYPICAL_AREA = Frame.fixed(500.0, 270.0)  # two figures per row in a 1280-pixel window
LABEL_FONT = 11
LIMIT_NOTE = "accuracy-drop limit"
_LIMIT_COLOUR = "#7F7F7F"


def text_box(text: str, fx: float, fy: float) -> Box:
    """A generous estimate of an annotation's box at LABEL_FONT: proportional glyphs, 2 px padding around."""
    return Box(fx, fy, width=len(text) * 0.62 * LABEL_FONT + 8, height=LABEL_FONT * 1.3 + 6)


def _axis(x: str, limits: tuple[float, float], log: bool) -> dict:
    """x-axis settings: the given range, log or linear, readable units on the ticks (binary for sizes)."""
    title, fmt = AXES[x]
    axis: dict = {"title": {"text": title}, "type": "log" if log else "linear"}
    axis["range"] = [math.log10(v) for v in limits] if log else list(limits)
    if x == "size_bytes":
        axis["tickvals"] = size_ticks(*limits, log)
        axis["ticktext"] = [fmt(v) for v in axis["tickvals"]]
    elif x == "latency_ms":
        axis["ticksuffix"] = " ms"
    else:
        axis["tickformat"] = "~s"
    return axis


def _points_trace(rows: list[dict], x: str, style: Style, run: RunData) -> go.Scatter:
    """One point group's markers (the labels of the baseline and references are annotations)."""
    return go.Scatter(
        x=[r[x] for r in rows],
        y=[r["validation"] for r in rows],
        name=f"{style.name} ({len(rows)})",
        legendgroup="front" if style is PARETO else style.name,
        mode="markers",
        hovertext=[hover_text(r, run.run_info) for r in rows],
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


def _limit_note(limit: float, ylim: tuple[float, float]) -> tuple[dict, Box]:
    """The accuracy-drop limit's note (right end, under the line) and the box it takes, which labels avoid."""
    box = text_box(LIMIT_NOTE, 1.0, fraction(limit, ylim, False))
    note = dict(
        x=1,
        xref="paper",
        y=limit,
        yref="y",
        text=LIMIT_NOTE,
        showarrow=False,
        xanchor="right",
        yanchor="top",
        font=dict(color=_LIMIT_COLOUR, size=LABEL_FONT),
        borderpad=2,
    )
    return note, replace(box, dx=-box.width / 2, dy=-box.height / 2)


def label_boxes(run: RunData, x: str, limits: Limits) -> list[Box]:
    """Where the labels of the baseline and references go on the validation-versus-`x` plot, as placed boxes
    (in the order of `labelled_points`)."""
    points = labelled_points(run, x)
    anchors = [(fraction(p.x, limits.x, limits.log), fraction(p.y, limits.y, False)) for p in points]
    markers = [Box(fx, fy, p.style.size, p.style.size) for p, (fx, fy) in zip(points, anchors, strict=True)]
    limit = drop_limit(run.run_info)
    fixed = [_limit_note(limit, limits.y)[1]] if limit is not None else []
    labels = [text_box(p.text, fx, fy) for p, (fx, fy) in zip(points, anchors, strict=True)]
    others = [
        Box(fraction(px, limits.x, limits.log), fraction(py, limits.y, False), style.size, style.size)
        for px, py, style in unlabelled_points(run, x)
    ]
    return place(labels, markers + fixed, PLOT_AREA, [p.style.size / 2 for p in points], others, TYPICAL_AREA)


def _annotations(run: RunData, x: str, limits: Limits) -> list[dict]:
    """The labels as plotly annotations: text centred at the placed box, a thin line to the point."""
    found = []
    for point, box in zip(labelled_points(run, x), label_boxes(run, x, limits), strict=True):
        found.append(
            dict(
                x=math.log10(point.x) if limits.log else point.x,
                y=point.y,
                text=html.escape(point.text),
                showarrow=True,
                ax=box.dx,
                ay=-box.dy,  # plotly's pixel offsets point down
                xanchor="center",
                yanchor="middle",
                arrowhead=0,
                arrowwidth=1,
                arrowcolor=point.style.colour,
                standoff=point.style.size / 2,
                font=dict(color=point.style.colour, size=LABEL_FONT),
                bgcolor="rgba(255,255,255,0.85)",
                borderpad=2,
            )
        )
    return found


def front_figure(run: RunData, x: str) -> go.Figure:
    """Validation metric versus `x`: all trials faint, the front as a step line, baseline and references labelled."""
    fig = go.Figure()
    for group in point_groups(run):
        rows = [r for r in group.rows if has_point(r, x)]
        if not rows:
            continue
        if group.style is PARETO:
            fig.add_trace(_front_line(rows, x))
        fig.add_trace(_points_trace(rows, x, group.style, run))
    limits = plot_limits(run, x)
    annotations = _annotations(run, x, limits)
    limit = drop_limit(run.run_info)
    if limit is not None:
        fig.add_hline(y=limit, line=dict(color=_LIMIT_COLOUR, dash="dot", width=1))
        annotations.append(_limit_note(limit, limits.y)[0])
    fig.update_layout(
        template="plotly_white",
        font=FONT,
        height=460,
        margin=dict(l=60, r=20, t=50, b=50),
        title=dict(text=f"{run.metric} vs {AXES[x][0]}", x=0.01, font=dict(size=15)),
        xaxis=_axis(x, limits.x, limits.log),
        yaxis=dict(title=dict(text=f"validation {run.metric}"), range=list(limits.y)),
        legend=dict(orientation="h", yanchor="top", y=-0.16, x=0, font=dict(size=11)),
        hoverlabel=dict(align="left", font=dict(size=12)),
        annotations=annotations,
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

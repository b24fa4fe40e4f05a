"""`front.png`: the main plots drawn with matplotlib's Agg canvas, for pasting into issues and pull requests.

A Figure bound to its own Agg canvas avoids pyplot's process-wide state and plotly's kaleido dependency.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator

from orchestrator.report._data import RunData
from orchestrator.report._labels import Box, Frame, place
from orchestrator.report._points import (
    AXES,
    FRONT_COLOUR,
    PARETO,
    Style,
    drop_limit,
    has_point,
    labelled_points,
    plot_limits,
    point_groups,
    step_line,
    unlabelled_points,
)
from orchestrator.report._scale import size_ticks

_MARKERS = {"circle": "o", "x": "x", "diamond": "D", "star": "*"}
DPI = 120
LABEL_GID = "point-label"  # the gid of every point label, for finding them again
_PAD = 2.0  # pixels of white around a label's text


def _marker_px(style: Style) -> float:
    """A marker's diameter in pixels: its area is size² × 0.9 points², a point is DPI / 72 pixels."""
    return style.size * 0.9**0.5 * DPI / 72


def _scatter(ax: Axes, style: Style, xs: list[float], ys: list[float]) -> None:
    face = "none" if style.hollow else style.colour
    edge = style.colour if style.hollow else "white"
    marker = _MARKERS[style.marker]
    # "x" is a line marker in matplotlib: it takes a colour, not a face and an edge.
    kwargs: dict[str, Any] = {"c": style.colour} if marker == "x" else {"facecolors": face, "edgecolors": edge}
    ax.scatter(
        xs,
        ys,
        marker=marker,
        s=style.size**2 * 0.9,
        alpha=style.opacity,
        linewidths=1.2,
        label=f"{style.name} ({len(xs)})",
        zorder=3,
        **kwargs,
    )


def _x_axis(ax: Axes, run: RunData, x: str) -> None:
    """The shared limits, a log scale for wide spans, ticks in KiB/MiB (binary steps) for sizes."""
    limits = plot_limits(run, x)
    fmt = AXES[x][1]
    if limits.log:
        ax.set_xscale("log", base=2 if x == "size_bytes" else 10)
    if x == "size_bytes":
        locator = LogLocator(base=2, numticks=8) if limits.log else FixedLocator(size_ticks(*limits.x, False))
        ax.xaxis.set_major_locator(locator)
    elif not limits.log:
        ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: fmt(value)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda _value, _pos: ""))
    ax.set_xlim(*limits.x)
    ax.set_ylim(*limits.y)


def _panel(ax: Axes, run: RunData, x: str) -> None:
    for group in point_groups(run):
        rows = [r for r in group.rows if has_point(r, x)]
        if not rows:
            continue
        if group.style is PARETO:
            line_x, line_y = step_line(rows, x)
            ax.step(line_x, line_y, where="post", color=FRONT_COLOUR, linewidth=1.8, zorder=2)
        _scatter(ax, group.style, [r[x] for r in rows], [r["validation"] for r in rows])
    limit = drop_limit(run.run_info)
    if limit is not None:
        ax.axhline(limit, color="#7F7F7F", linestyle=":", linewidth=1, zorder=1)
    _x_axis(ax, run, x)
    title = AXES[x][0]
    ax.set_xlabel(title)
    ax.set_ylabel(f"validation {run.metric}")
    ax.set_title(f"{run.metric} vs {title}", loc="left", fontsize=11)
    ax.grid(True, color="#E5E5E5", linewidth=0.8, zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _annotation(ax: Axes, text: str, xy: tuple[float, float], style: Style) -> Annotation:
    """A label on `xy`, moved later; a thin line joins it to the point once it is moved away."""
    note = ax.annotate(
        text,
        xy,
        xytext=(0, 0),
        textcoords="offset pixels",
        ha="center",
        va="center",
        fontsize=8,
        color=style.colour,
        zorder=4,
        annotation_clip=False,
        bbox=dict(boxstyle=f"square,pad={_PAD * 72 / DPI / 8:.3f}", facecolor="white", edgecolor="none", alpha=0.85),
        arrowprops=dict(arrowstyle="-", color=style.colour, linewidth=0.7, shrinkA=0, shrinkB=_marker_px(style) / 2),
        gid=LABEL_GID,
    )
    note.set_in_layout(False)  # placed after the layout, so it must not move the axes
    return note


def _labels(ax: Axes, run: RunData, x: str, renderer: RendererBase) -> None:
    """Label the baseline and references of a laid-out panel, measuring each text to keep them apart."""
    points, others = labelled_points(run, x), unlabelled_points(run, x)
    notes = [_annotation(ax, p.text, (p.x, p.y), p.style) for p in points]
    area = ax.get_window_extent(renderer)
    anchors, spots = (
        ax.transAxes.inverted().transform(ax.transData.transform(np.reshape(xy, (-1, 2))))
        for xy in ([(p.x, p.y) for p in points], [(px, py) for px, py, _ in others])
    )
    extents = [Text.get_window_extent(n, renderer) for n in notes]  # the text alone, not its line
    diameters = [_marker_px(p.style) for p in points]
    pads = [(e.width + 2 * _PAD, e.height + 2 * _PAD) for e in extents]
    labels = [Box(fx, fy, w, h) for (fx, fy), (w, h) in zip(anchors, pads, strict=True)]
    markers = [Box(fx, fy, d, d) for (fx, fy), d in zip(anchors, diameters, strict=True)]
    around = [
        Box(fx, fy, _marker_px(style), _marker_px(style)) for (fx, fy), (*_, style) in zip(spots, others, strict=True)
    ]
    placed = place(labels, markers, Frame.fixed(area.width, area.height), [d / 2 for d in diameters], around)
    for note, box in zip(notes, placed, strict=True):
        note.xyann = (box.dx, box.dy)


def front_plot(run: RunData) -> Figure:
    """Validation metric versus size and versus latency, side by side, with one shared legend and labels placed
    so that none overlaps another (the figure is drawn once for its layout)."""
    axes = [x for x in ("size_bytes", "latency_ms") if any(has_point(r, x) for r in run.trials + run.front)]
    fig = Figure(figsize=(5.2 * max(1, len(axes)), 4.4), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    panels = fig.subplots(1, max(1, len(axes)), squeeze=False)[0]
    for ax, x in zip(panels, axes, strict=False):
        _panel(ax, run, x)
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(3, max(1, len(labels))), fontsize=8, frameon=False
    )
    fig.suptitle(f"Pareto front — {run.run_info.get('workload') or 'run'}", x=0.01, ha="left", fontsize=12)
    canvas.draw()  # fixes the layout, so labels are placed in final pixels
    renderer = canvas.get_renderer()
    for ax, x in zip(panels, axes, strict=False):
        _labels(ax, run, x, renderer)
    return fig


def front_png(run: RunData) -> bytes:
    """PNG bytes of `front_plot`."""
    buffer = io.BytesIO()
    front_plot(run).savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()

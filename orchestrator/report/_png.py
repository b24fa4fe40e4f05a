"""`front.png`: the main plots drawn with matplotlib's Agg canvas, for pasting into issues and pull requests.

A Figure bound to its own Agg canvas avoids pyplot's process-wide state and plotly's kaleido dependency.
"""

from __future__ import annotations

import io

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from orchestrator.report._data import RunData
from orchestrator.report._points import (
    AXES,
    FRONT_COLOUR,
    PARETO,
    Style,
    drop_limit,
    has_point,
    log_scale,
    point_groups,
    point_label,
    step_line,
)

_MARKERS = {"circle": "o", "x": "x", "diamond": "D", "star": "*"}


def _scatter(ax: Axes, style: Style, xs: list[float], ys: list[float], labels: list[str]) -> None:
    face = "none" if style.hollow else style.colour
    edge = style.colour if style.hollow else "white"
    marker = _MARKERS[style.marker]
    # "x" is a line marker in matplotlib: it takes a colour, not a face and an edge.
    kwargs = {"c": style.colour} if marker == "x" else {"facecolors": face, "edgecolors": edge}
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
    if style.labelled:
        for x, y, label in zip(xs, ys, labels, strict=True):
            ax.annotate(
                label,
                (x, y),
                xytext=(0, 7),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color=style.colour,
                zorder=4,
            )


def _panel(ax: Axes, run: RunData, x: str) -> None:
    title, fmt = AXES[x]
    xs_all: list[float] = []
    for group in point_groups(run):
        rows = [r for r in group.rows if has_point(r, x)]
        if not rows:
            continue
        xs = [r[x] for r in rows]
        xs_all += xs
        if group.style is PARETO:
            line_x, line_y = step_line(rows, x)
            ax.step(line_x, line_y, where="post", color=FRONT_COLOUR, linewidth=1.8, zorder=2)
        _scatter(ax, group.style, xs, [r["validation"] for r in rows], [point_label(r) for r in rows])
    limit = drop_limit(run.run_info)
    if limit is not None:
        ax.axhline(limit, color="#7F7F7F", linestyle=":", linewidth=1, zorder=1)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    if log_scale(xs_all):
        ax.set_xscale("log", base=2 if x == "size_bytes" else 10)
        if x == "size_bytes":
            ax.xaxis.set_major_locator(LogLocator(base=2, numticks=8))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: fmt(value)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda _value, _pos: ""))
    ax.set_xlabel(title)
    ax.set_ylabel(f"validation {run.metric}")
    ax.set_title(f"{run.metric} vs {title}", loc="left", fontsize=11)
    ax.grid(True, color="#E5E5E5", linewidth=0.8, zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def front_png(run: RunData) -> bytes:
    """PNG bytes of validation metric versus size and versus latency, side by side, with one shared legend."""
    axes = [x for x in ("size_bytes", "latency_ms") if any(has_point(r, x) for r in run.trials + run.front)]
    fig = Figure(figsize=(5.2 * max(1, len(axes)), 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, max(1, len(axes)), squeeze=False)[0]
    for ax, x in zip(panels, axes, strict=False):
        _panel(ax, run, x)
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(3, max(1, len(labels))), fontsize=8, frameon=False
    )
    fig.suptitle(f"Pareto front — {run.run_info.get('workload') or 'run'}", x=0.01, ha="left", fontsize=12)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()

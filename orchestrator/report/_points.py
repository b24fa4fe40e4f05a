"""Which trials are drawn how: one list of point groups shared by the interactive plots and the PNG.

Colours are from the Okabe-Ito palette, which stays distinguishable under common colour-vision deficiencies;
groups also differ in marker shape and fill, so nothing relies on colour alone.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.pareto import guard_limit, pareto_mask
from orchestrator.report._compare import fmt_change, fmt_size_change, fmt_speed, speed_spread
from orchestrator.report._data import RunData
from orchestrator.report._format import (
    fmt_bytes,
    fmt_count,
    fmt_metric,
    fmt_ms,
    fmt_techniques,
    metric_direction,
    ratio,
)
from orchestrator.report._policy import policy_name, summary
from orchestrator.report._scale import axis_range

# Axes a plot can use: column → (axis title, formatter of a tick value).
AXES = {
    "size_bytes": ("size on disk", fmt_bytes),
    "latency_ms": ("latency (median)", lambda value: f"{value:g} ms"),
    "flops": ("FLOPs", fmt_count),
}
FRONT_COLOUR = "#0072B2"


@dataclass(frozen=True)
class Style:
    """How a group looks; `marker` is one of circle, x, diamond, star, `labelled` adds the trial id as text."""

    name: str
    colour: str
    marker: str
    hollow: bool = False
    size: float = 8
    opacity: float = 1.0
    labelled: bool = False


COMPLETED = Style("trials", "#8DA0B6", "circle", size=7, opacity=0.55)
STOPPED = Style("stopped early (ASHA)", "#E69F00", "circle", hollow=True, size=7, opacity=0.9)
INFEASIBLE = Style("infeasible (over accuracy-drop limit)", "#7F7F7F", "x", hollow=True, size=7, opacity=0.8)
PARETO = Style("Pareto front", FRONT_COLOUR, "circle", size=11)
REFERENCE = Style("reference policies", "#D55E00", "diamond", size=11, labelled=True)
BASELINE = Style("baseline (uncompressed)", "#000000", "star", size=15, labelled=True)


@dataclass(frozen=True)
class Group:
    style: Style
    rows: list[dict[str, Any]]


def point_groups(run: RunData) -> list[Group]:
    """Trials split into groups, drawn in this order (later groups on top); failed trials are not drawn."""
    front_ids = {row.get("trial_id") for row in run.front}
    search = [t for t in run.trials if t.get("role") == "search" and t.get("trial_id") not in front_ids]
    groups = [
        Group(COMPLETED, [t for t in search if t.get("status") == "completed" and t.get("feasible")]),
        Group(STOPPED, [t for t in search if t.get("status") == "stopped_early"]),
        Group(INFEASIBLE, [t for t in search if t.get("status") == "completed" and not t.get("feasible")]),
        Group(PARETO, list(run.front)),
        Group(REFERENCE, [t for t in run.trials if t.get("role") == "reference" and t.get("status") != "failed"]),
        Group(BASELINE, [t for t in run.trials if t.get("role") == "baseline"] or _baseline_row(run.run_info)),
    ]
    return [g for g in groups if g.rows]


def _baseline_row(run_info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The baseline from the run facts, for runs whose trials table has no baseline row."""
    base = run_info.get("baseline") or {}
    return (
        [{**base, "trial_id": "baseline", "role": "baseline", "status": "completed", "feasible": True}] if base else []
    )


def point_label(row: Mapping[str, Any]) -> str:
    """Text next to a labelled point: "baseline", else the policy's name, else the trial id; infeasible
    points say so."""
    if row.get("role") == "baseline":
        return "baseline"
    name = policy_name(row.get("policy_json")) or str(row.get("trial_id"))
    return name if row.get("feasible", True) else f"{name} (infeasible)"


@dataclass(frozen=True)
class LabelledPoint:
    """A point that carries its name on the plots (the baseline, the references)."""

    text: str
    x: float
    y: float
    style: Style


def labelled_points(run: RunData, x: str) -> list[LabelledPoint]:
    """The baseline first, then the references, each with its label, where they have a value of `x`."""
    groups = sorted((g for g in point_groups(run) if g.style.labelled), key=lambda g: g.style is not BASELINE)
    return [
        LabelledPoint(point_label(r), float(r[x]), float(r["validation"]), g.style)
        for g in groups
        for r in g.rows
        if has_point(r, x)
    ]


def has_point(row: Mapping[str, Any], x: str) -> bool:
    """Whether a row can be placed on the validation-versus-`x` plane."""
    return row.get("validation") is not None and row.get(x) is not None


def step_line(front: Sequence[Mapping[str, Any]], x: str) -> tuple[list[float], list[float]]:
    """The front's points that stay non-dominated in the (max validation, min `x`) plane, sorted by `x`.

    A front over more objectives projects onto this plane with some points dominated; the step line links
    only those that are not, so it reads as the trade-off curve of this plot.
    """
    points = np.array([[r["validation"], r[x]] for r in front if has_point(r, x)], dtype=float).reshape(-1, 2)
    if not len(points):
        return [], []
    kept = points[pareto_mask(points, ["maximize", "minimize"])]
    kept = kept[np.lexsort((-kept[:, 0], kept[:, 1]))]
    return kept[:, 1].tolist(), kept[:, 0].tolist()


def log_scale(values: Sequence[float]) -> bool:
    """A log axis when the positive values span at least a factor of 8 (compression ratios usually do)."""
    positive = [v for v in values if v is not None and v > 0]
    return (
        len(positive) == len([v for v in values if v is not None])
        and bool(positive)
        and (max(positive) / min(positive) >= 8)
    )


def _status(row: Mapping[str, Any]) -> str:
    status = str(row.get("status", "n/a")).replace("_", " ")
    return status + ("" if row.get("feasible", True) else ", infeasible")


def _versus_baseline(row: Mapping[str, Any], run_info: Mapping[str, Any]) -> tuple[str, str, str]:
    """(metric change, size change, speed change) in words, empty for the baseline itself."""
    base = run_info.get("baseline") or {}
    if row.get("role") == "baseline" or not base:
        return "", "", ""
    compression = row.get("compression_ratio") or ratio(base.get("size_bytes"), row.get("size_bytes"))
    speedup = row.get("speedup") or ratio(base.get("latency_ms"), row.get("latency_ms"))
    return (
        f" ({fmt_change(row.get('validation'), base.get('validation'), metric_direction(run_info))} vs baseline)",
        f" ({fmt_size_change(compression)})",
        f" ({fmt_speed(speedup, speed_spread(row, base))})",
    )


def unlabelled_points(run: RunData, x: str) -> list[tuple[float, float, Style]]:
    """(x, validation, style) of every other drawn point: labels try not to cover them."""
    return [
        (float(r[x]), float(r["validation"]), g.style)
        for g in point_groups(run)
        if not g.style.labelled
        for r in g.rows
        if has_point(r, x)
    ]


@dataclass(frozen=True)
class Limits:
    """A plot's axis ranges in data units, and whether its x axis is logarithmic."""

    x: tuple[float, float]
    y: tuple[float, float]
    log: bool


def plot_limits(run: RunData, x: str) -> Limits:
    """Axis ranges around every drawn point and the accuracy-drop limit, with room above the best models for
    their labels."""
    rows = [r for g in point_groups(run) for r in g.rows if has_point(r, x)]
    xs, ys = [float(r[x]) for r in rows], [float(r["validation"]) for r in rows]
    limit = drop_limit(run.run_info)
    ys += [limit] if limit is not None else []
    if not xs:
        return Limits((0.0, 1.0), axis_range(ys or [0.0, 1.0], False), False)
    log = log_scale(xs)
    return Limits(axis_range(xs, log), axis_range(ys, False, pad=0.06, top=0.2), log)


def hover_text(row: Mapping[str, Any], run_info: Mapping[str, Any]) -> str:
    """Trial id, status, metrics, techniques and a compact policy summary, as plotly hover HTML."""
    metric = run_info.get("metric") or "metric"
    drop, smaller, faster = _versus_baseline(row, run_info)
    name = policy_name(row.get("policy_json"))
    lines = [
        f"{row.get('trial_id')} ({row.get('role', 'n/a')}, {_status(row)})" + (f" · {name}" if name else ""),
        f"validation {metric}: {fmt_metric(row.get('validation'))}{drop}"
        + (f" · test: {fmt_metric(row['test'])}" if row.get("test") is not None else ""),
        f"size: {fmt_bytes(row.get('size_bytes'))}{smaller}",
        f"latency: {fmt_ms(row.get('latency_ms'))}{faster}",
        f"FLOPs: {fmt_count(row.get('flops'))}",
        f"techniques: {fmt_techniques(row.get('techniques'))}",
        *summary(row.get("policy_json")),
    ]
    lines = [html.escape(line, quote=False) for line in lines]
    return "<br>".join([f"<b>{lines[0]}</b>", *lines[1:]])


def drop_limit(run_info: Mapping[str, Any]) -> float | None:
    """The worst validation metric still feasible (`orchestrator.pareto.guard_limit`), if the run had a guard."""
    base = (run_info.get("baseline") or {}).get("validation")
    drop = run_info.get("max_accuracy_drop")
    if base is None or drop is None:
        return None
    return guard_limit(float(base), float(drop), metric_direction(run_info))

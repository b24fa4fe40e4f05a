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

from orchestrator.pareto import pareto_mask
from orchestrator.report._data import RunData
from orchestrator.report._format import fmt_bytes, fmt_count, fmt_metric, fmt_ms, fmt_ratio, fmt_techniques
from orchestrator.report._policy import policy_name, summary

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
    """Text next to a labelled point: "baseline", else the policy's name, else the trial id."""
    if row.get("role") == "baseline":
        return "baseline"
    return policy_name(row.get("policy_json")) or str(row.get("trial_id"))


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


def hover_text(row: Mapping[str, Any], metric: str) -> str:
    """Trial id, status, metrics, techniques and a compact policy summary, as plotly hover HTML."""
    status = row.get("status", "n/a") + ("" if row.get("feasible", True) else ", infeasible")
    lines = [
        f"{row.get('trial_id')} ({row.get('role', 'n/a')}, {status})"
        + (f" · {policy_name(row.get('policy_json'))}" if policy_name(row.get("policy_json")) else ""),
        f"validation {metric}: {fmt_metric(row.get('validation'))}"
        + (f" · test: {fmt_metric(row['test'])}" if row.get("test") is not None else ""),
        f"size: {fmt_bytes(row.get('size_bytes'))} ({fmt_ratio(row.get('compression_ratio'))} smaller)",
        f"latency: {fmt_ms(row.get('latency_ms'))} ({fmt_ratio(row.get('speedup'))} faster)",
        f"FLOPs: {fmt_count(row.get('flops'))}",
        f"techniques: {fmt_techniques(row.get('techniques'))}",
        *summary(row.get("policy_json")),
    ]
    lines = [html.escape(line, quote=False) for line in lines]
    return "<br>".join([f"<b>{lines[0]}</b>", *lines[1:]])


def drop_limit(run_info: Mapping[str, Any]) -> float | None:
    """The lowest validation metric still feasible (baseline minus the allowed drop), if the run had one."""
    base = (run_info.get("baseline") or {}).get("validation")
    drop = run_info.get("max_accuracy_drop")
    return None if base is None or drop is None else float(base) - float(drop)

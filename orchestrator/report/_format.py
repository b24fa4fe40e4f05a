"""Numbers and run facts as people read them: 12.3 KiB, 4.20×, 0.412 ms, 1.23 MFLOPs, "4 min 12 s"."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

NA = "n/a"
_ARROWS = {"maximize": "↑", "minimize": "↓"}


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None for missing, NaN and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


number = _number  # for the other report modules


def _three_figures(value: float) -> str:
    """About three significant figures without scientific notation: 0.412, 4.12, 41.2, 412."""
    magnitude = abs(value)
    decimals = 3 if magnitude < 1 else 2 if magnitude < 10 else 1 if magnitude < 100 else 0
    return f"{value:.{decimals}f}"


def _scaled(value: Any, base: int, units: Sequence[str]) -> str:
    """`value` divided by the largest power of `base` that keeps it >= 1, with that power's unit."""
    number = _number(value)
    if number is None:
        return NA
    power = 0
    while abs(number) >= base and power < len(units) - 1:
        number /= base
        power += 1
    unit = units[power]
    text = str(int(number)) if number == int(number) else _three_figures(number)
    return f"{text} {unit}".rstrip()


def fmt_bytes(value: Any) -> str:
    """Binary units, as file managers and `ls -h` show sizes."""
    return _scaled(value, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def fmt_count(value: Any, unit: str = "") -> str:
    """SI prefixes: 1.23 M, 45.6 k."""
    return _scaled(value, 1000, [f"{p}{unit}" for p in ("", "k", "M", "G", "T", "P")])


def fmt_metric(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{number:.4f}"


def fmt_ratio(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{number:.2f}×" if number < 10 else f"{number:.1f}×"


def fmt_ms(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{_three_figures(number)} ms"


def fmt_duration(seconds: Any) -> str:
    number = _number(seconds)
    if number is None:
        return NA
    if number < 60:
        return f"{number:.1f} s"
    minutes, secs = divmod(round(number), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_techniques(value: Any) -> str:
    """The comma-separated technique list with spaces, so it wraps; `none` for an uncompressed model."""
    return ", ".join(t.strip() for t in str(value or "none").split(","))


def ratio(numerator: Any, denominator: Any) -> float | None:
    """numerator / denominator when both are positive numbers, else None."""
    top, bottom = _number(numerator), _number(denominator)
    return top / bottom if top is not None and bottom else None


def text(value: Any) -> str:
    """Any metadata value, with missing ones as n/a."""
    return NA if value is None or value == "" else str(value)


def objectives(run_info: Mapping[str, Any]) -> str:
    """`validation ↑ · size_bytes ↓`."""
    names = run_info.get("objectives") or []
    directions = list(run_info.get("directions") or [])
    directions += [""] * (len(names) - len(directions))
    return " · ".join(f"{n} {_ARROWS.get(d, '')}".strip() for n, d in zip(names, directions, strict=False)) or NA


def _trial_counts(run_info: Mapping[str, Any], trials: Sequence[Mapping[str, Any]]) -> str:
    roles = Counter(t.get("role") for t in trials)
    statuses = Counter(t.get("status") for t in trials)
    infeasible = sum(1 for t in trials if t.get("status") == "completed" and not t.get("feasible"))
    budget = text(run_info.get("num_trials"))
    return (
        f"{roles['search']} search trials (budget {budget}), {roles['reference']} reference, "
        f"{roles['baseline']} baseline — {statuses['completed']} completed ({infeasible} infeasible), "
        f"{statuses['stopped_early']} stopped early, {statuses['failed']} failed"
    )


def _baseline(run_info: Mapping[str, Any]) -> str:
    base = run_info.get("baseline") or {}
    if not base:
        return NA
    metric = run_info.get("metric") or "metric"
    return (
        f"{metric} {fmt_metric(base.get('validation'))} (test {fmt_metric(base.get('test'))}) · "
        f"{fmt_bytes(base.get('size_bytes'))} · {fmt_ms(base.get('latency_ms'))} · "
        f"{fmt_count(base.get('flops'), 'FLOPs')}"
    )


def metric_direction(run_info: Mapping[str, Any]) -> str:
    """Whether the run's metric was maximised or minimised (its objective's recorded direction; maximised when
    the run info does not say)."""
    objectives, directions = list(run_info.get("objectives") or []), list(run_info.get("directions") or [])
    found = directions[objectives.index("validation")] if "validation" in objectives[: len(directions)] else None
    return "minimize" if found == "minimize" else "maximize"


def _constraint(run_info: Mapping[str, Any]) -> str:
    if "max_accuracy_drop" not in run_info:
        return NA
    drop = _number(run_info["max_accuracy_drop"])
    metric = run_info.get("metric") or "metric"
    if drop is None:
        return "none"
    if metric_direction(run_info) == "minimize":
        return f"{metric} at most {100 * drop:.4g}% above the baseline's"
    return f"{metric} drop ≤ {drop:g}"


def _search(run_info: Mapping[str, Any]) -> str:
    asha = run_info.get("asha")
    early = NA if asha is None else "on" if asha else "off"
    return f"{text(run_info.get('sampler'))}, seed {text(run_info.get('seed'))}, ASHA early stopping {early}"


def _when(iso: Any) -> str:
    """An ISO timestamp with a space instead of the `T`, which reads (and wraps) better."""
    return text(iso).replace("T", " ", 1)


def _versions(run_info: Mapping[str, Any]) -> str:
    versions = run_info.get("versions") or {}
    return " · ".join(f"{name} {version}" for name, version in sorted(versions.items())) or NA


def run_facts(run_info: Mapping[str, Any], trials: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) pairs describing a run, in reading order; missing facts read n/a."""
    threads = run_info.get("threads")
    return [
        ("workload", text(run_info.get("workload"))),
        ("metric", text(run_info.get("metric"))),
        ("objectives", objectives(run_info)),
        ("constraint", _constraint(run_info)),
        ("trials", _trial_counts(run_info, trials)),
        ("search", _search(run_info)),
        ("wall time", fmt_duration(run_info.get("wall_s"))),
        ("device", f"{text(run_info.get('device'))}, {text(threads)} threads"),
        ("started", f"{_when(run_info.get('started'))} → {_when(run_info.get('finished'))}"),
        ("baseline", _baseline(run_info)),
        ("versions", _versions(run_info)),
    ]

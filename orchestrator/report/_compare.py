"""How a model compares with the baseline, in words: metric change in points, size and speed ratios.

Every table and hover text goes through these, so a ratio below one never reads "0.91× faster".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.report._format import NA, fmt_ratio, number

MINUS = "\u2212"  # a typographic minus: "−0.74 pt" lines up with "+0.12 pt"
SAME_SPEED = 0.05  # without a measured spread, speed ratios within ±5 % of 1 read "about the same speed"


def change(value: Any, base: Any) -> float | None:
    """`value − base`, or None when either is missing."""
    top, bottom = number(value), number(base)
    return None if top is None or bottom is None else top - bottom


def fmt_change(value: Any, base: Any, direction: str = "maximize") -> str:
    """`value − base` in percentage points ("−0.74 pt", "+0.12 pt", "0.00 pt") when both are fractions in
    [0, 1] (accuracies and the like), else as a signed difference with four decimals; a minimised metric
    (perplexity) as the relative change ("+4.21%"), as its guard reads; n/a if either is missing."""
    top, bottom = number(value), number(base)
    if top is None or bottom is None:
        return NA
    if direction == "minimize" and bottom > 0:
        return _signed(f"{abs(top / bottom - 1) * 100:.2f}", top - bottom) + "%"
    diff = top - bottom
    fractions = 0 <= top <= 1 and 0 <= bottom <= 1
    magnitude = f"{abs(diff) * 100:.2f}" if fractions else f"{abs(diff):.4f}"
    return _signed(magnitude, diff) + (" pt" if fractions else "")


def _signed(magnitude: str, diff: float) -> str:
    return ("" if float(magnitude) == 0 else "+" if diff > 0 else MINUS) + magnitude


def fmt_size_change(compression: Any) -> str:
    """A size ratio (baseline size / model size) in words: 5.69× smaller, 1.10× larger (never 0.91× smaller)."""
    value = number(compression)
    if value is None or value <= 0:
        return NA
    if value == 1:
        return "same size"
    return f"{fmt_ratio(value)} smaller" if value > 1 else f"{fmt_ratio(1 / value)} larger"


def _spread_end(row: Mapping[str, Any], key: str) -> float | None:
    value = number(row.get(key))
    return value if value is not None and value > 0 else None


def speed_spread(row: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[float, float] | None:
    """The range the speed ratio of `row` may lie in, when something measured one, else None.

    Either the row says it (`speedup_low`, `speedup_high`), or it follows from the latency spreads
    (`latency_p10_ms`, `latency_p90_ms`) of the row and/or the baseline in the run facts: the slowest
    baseline run over the fastest model run is the largest ratio, and the other way round the smallest.
    """
    low, high = _spread_end(row, "speedup_low"), _spread_end(row, "speedup_high")
    if low is not None and high is not None:
        return min(low, high), max(low, high)
    median, base_median = _spread_end(row, "latency_ms"), _spread_end(base, "latency_ms")
    if median is None or base_median is None:
        return None
    fast, slow = (_spread_end(row, k) for k in ("latency_p10_ms", "latency_p90_ms"))
    base_fast, base_slow = (_spread_end(base, k) for k in ("latency_p10_ms", "latency_p90_ms"))
    if all(v is None for v in (fast, slow, base_fast, base_slow)):
        return None
    return (base_fast or base_median) / (slow or median), (base_slow or base_median) / (fast or median)


def fmt_speed(speedup: Any, spread: tuple[float, float] | None = None) -> str:
    """A speed ratio (baseline latency / model latency) in words.

    - With a measured spread (low, high) of the ratio, a spread that includes 1.0 is "no measurable change".
    - Without one, ratios within ±5 % of 1.0 (0.95 ≤ r ≤ 1.05) are "about the same speed": the medians of
      a small model's latency move about that much from one measurement to the next.
    - Otherwise r > 1 reads "1.25× faster" and r < 1 reads "1.10× slower" (1 / r), never "0.91× faster".
    """
    value = number(speedup)
    if value is None or value <= 0:
        return NA
    if spread is not None and min(spread) <= 1 <= max(spread):
        return "no measurable change"
    if spread is None and abs(value - 1) <= SAME_SPEED + 1e-12:
        return "about the same speed"
    return f"{fmt_ratio(value)} faster" if value > 1 else f"{fmt_ratio(1 / value)} slower"

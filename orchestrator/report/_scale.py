"""Axis ranges and size ticks shared by the interactive plots and the PNG.

Ranges are fixed by the report rather than left to the plotting library, so that label positions can be
computed before drawing. Size ticks fall on binary steps (256 KiB, 512 KiB, 1 MiB, ...), matching the
KiB/MiB of the tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_KIB = 1024
_NICE = (1, 2, 2.5, 5, 10)


def axis_range(values: Sequence[float], log: bool, pad: float = 0.06, top: float | None = None) -> tuple[float, float]:
    """(low, high) around `values` with `pad` of the span below and `top` (default `pad`) above; for log
    axes the padding is a share of the span of the logarithms, the limits are in data units all the same."""
    points = [math.log10(v) for v in values] if log else list(values)
    low, high = min(points), max(points)
    span = high - low or (abs(high) * 0.2 if not log and high else 0.2)
    low, high = low - pad * span, high + (pad if top is None else top) * span
    return (10**low, 10**high) if log else (low, high)


def fraction(value: float, limits: tuple[float, float], log: bool) -> float:
    """Where `value` sits between the axis limits, 0 at the low end and 1 at the high end."""
    low, high = limits
    if log:
        value, low, high = math.log10(value), math.log10(low), math.log10(high)
    return (value - low) / (high - low)


def _powers_of_two(low: float, high: float) -> list[float]:
    """Powers of two (16 KiB, 32 KiB, ...) inside [low, high], at most about eight."""
    first, last = math.ceil(math.log2(low)), math.floor(math.log2(high))
    stride = max(1, math.ceil((last - first + 1) / 8))
    return [2.0**p for p in range(first, last + 1, stride)]


def _linear_binary(low: float, high: float) -> list[float]:
    """Three to six round steps of the largest binary unit not above `high`: 20 KiB, 40 KiB ... or 0.5 MiB, 1 MiB."""
    unit = float(_KIB ** max(0, math.floor(math.log(max(high, 1.0), _KIB))))
    raw = max((high - low) / unit, 1e-9) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in _NICE if m * magnitude >= raw) * unit
    first = math.ceil(low / step)
    return [k * step for k in range(first, math.floor(high / step) + 1) if k * step >= 0]


def size_ticks(low: float, high: float, log: bool) -> list[float]:
    """Byte values to put ticks at within the axis limits [low, high]."""
    return _powers_of_two(low, high) if log else _linear_binary(low, high)

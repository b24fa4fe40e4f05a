"""Paired timing: how long a forward pass takes, and how much faster a model runs than its baseline timed beside it.

`time_latency` times one model; `time_paired` times a model and its baseline in alternating blocks at the same
moments, and its speedup is the median of the per-round ratios with their spread. What is timed is a torch module
or a model `Deployed` in another runtime (an ONNX Runtime session, `targets.OnnxSession`); both become a
zero-argument forward on fixed inputs, so one timing implementation serves every target.

Decisions: the clock is injectable (`clock=`, default `time.perf_counter`) so that tests check the arithmetic of
timing with exact, fake durations instead of asserting how fast the machine happens to be. A recorded spread is
never narrower than ±REPRODUCIBILITY around its median, and a timed block lasts at least MIN_BLOCK_S, for the
reasons given beside each constant (the measurements behind them are in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from techniques.tools.inputs import Inputs, batch_length, call_model, device_of

# The same pair re-timed in another process (other memory layout, other moment) moves by more than its rounds
# disagree within one process: a recorded spread is therefore never narrower than this fraction either side of
# its median, and smaller changes are no measurable change.
REPRODUCIBILITY = 0.05
# A paired block of forwards lasts at least this long, so that one busy moment of the machine (a few ms) covers
# few of a pairing's rounds and the median of rounds leaves it out.
MIN_BLOCK_S = 0.025


class Deployed(Protocol):
    """A model as a runtime other than PyTorch runs it (e.g. `targets.OnnxSession`)."""

    target: str  # the deployment target it is measured for
    threads: int  # the threads its runtime computes with

    @property
    def size_bytes(self) -> int: ...  # bytes of the artifact that runtime loads

    @property
    def runtime(self) -> str: ...  # the runtime and its version, e.g. "onnxruntime 1.31.1 (CPUExecutionProvider)"

    def bind(self, inputs: Inputs) -> Callable[[], object]: ...  # one forward pass on these inputs


Timed = nn.Module | Deployed  # what the timing functions run
# Seconds from an arbitrary origin, as `time.perf_counter` returns them (tests pass a fake one).
Clock = Callable[[], float]


@dataclass(frozen=True)
class Latency:
    """Wall time of one forward pass: median with its spread (10th and 90th percentiles)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    warmup: int
    batch_size: int


@dataclass(frozen=True)
class Speedup:
    """How much faster a model runs than its baseline, timed beside it in the same process: the median of the
    per-round ratios (baseline time / model time) and their 10th–90th percentile spread, never narrower than
    ±REPRODUCIBILITY around the median. A spread that includes 1 is no measurable change."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def measurable(self) -> bool:
        return not self.low <= 1.0 <= self.high


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Compute with `count` threads inside the block (as the measurement being repeated did); None: as is."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _forward(timed: Timed, inputs: Inputs) -> Callable[[], object]:
    """One forward pass of `timed` on `inputs`, finished when it returns (CUDA work synchronised)."""
    if not isinstance(timed, nn.Module):
        return timed.bind(inputs)
    model = timed.eval()
    if device_of(inputs).type != "cuda":
        return lambda: call_model(model, inputs)

    def synchronised() -> None:
        call_model(model, inputs)
        torch.cuda.synchronize()

    return synchronised


def time_latency(
    model: Timed, example_inputs: Inputs, *, warmup: int = 10, runs: int = 50, clock: Clock = time.perf_counter
) -> Latency:
    """Median wall time of `runs` forward passes after `warmup`, in inference mode, on the inputs' device (a
    `Deployed` model: in its own runtime)."""
    forward = _forward(model, example_inputs)
    with torch.inference_mode():
        _timed_block(forward, warmup, clock)
        times = _timed_block(forward, runs, clock)
    return _latency_of(times, warmup, batch_length(example_inputs))


def _timed_block(forward: Callable[[], object], runs: int, clock: Clock) -> list[float]:
    times = []
    for _ in range(runs):
        start = clock()
        forward()
        times.append((clock() - start) * 1000.0)
    return times


def _latency_of(times: list[float], warmup: int, batch_size: int) -> Latency:
    ordered = sorted(times)
    return Latency(
        statistics.median(ordered),
        _percentile(ordered, 0.1),
        _percentile(ordered, 0.9),
        len(ordered),
        warmup,
        batch_size,
    )


def _block_runs(warmup_ms: list[float], runs: int) -> int:
    """Forwards per timed block: `runs`, or enough to last MIN_BLOCK_S at the warm-up's median speed."""
    per_run_ms = statistics.median(warmup_ms) if warmup_ms else 0.0
    return max(runs, math.ceil(MIN_BLOCK_S * 1000 / per_run_ms) if per_run_ms > 0 else runs)


def time_paired(
    model: Timed,
    baseline: Timed,
    inputs: Inputs,
    *,
    rounds: int = 7,
    runs: int = 20,
    warmup: int = 5,
    across_runtimes: bool = False,
    clock: Clock = time.perf_counter,
) -> tuple[Latency, Latency, Speedup]:
    """Time `model` and `baseline` (torch modules, or both deployed in one runtime; `across_runtimes` allows one
    of each, as a deployment benchmark compares them) in alternating blocks of at least `runs` forwards and
    MIN_BLOCK_S seconds (the order flips every round), so both see the same moments of a busy machine; the
    speedup is the median of the per-round ratios."""
    if not across_runtimes and isinstance(model, nn.Module) != isinstance(baseline, nn.Module):
        raise TypeError("a model and its baseline are timed in the same runtime: both torch modules, or both deployed")
    forwards = {id(model): _forward(model, inputs), id(baseline): _forward(baseline, inputs)}
    ours: list[float] = []
    theirs: list[float] = []
    ratios = []
    with torch.inference_mode():
        counts = {key: _block_runs(_timed_block(forward, warmup, clock), runs) for key, forward in forwards.items()}
        for index in range(rounds):
            first, second = (model, baseline) if index % 2 == 0 else (baseline, model)
            blocks = {id(first): _timed_block(forwards[id(first)], counts[id(first)], clock)}
            blocks.setdefault(id(second), _timed_block(forwards[id(second)], counts[id(second)], clock))
            mine, base = blocks[id(model)], blocks[id(baseline)]
            ours += mine
            theirs += base
            ratios.append(statistics.median(base) / statistics.median(mine))
    ratios.sort()
    median = statistics.median(ratios)
    low = min(_percentile(ratios, 0.1), median / (1 + REPRODUCIBILITY))
    high = max(_percentile(ratios, 0.9), median * (1 + REPRODUCIBILITY))
    speedup = Speedup(median, low, high, rounds)
    size = batch_length(inputs)
    return _latency_of(ours, warmup, size), _latency_of(theirs, warmup, size), speedup

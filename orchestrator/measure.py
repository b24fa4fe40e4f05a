"""Honest measurements of a model as deployed: bytes on disk, latency, parameters, non-zeros, FLOPs.

`measure(model, inputs, base=...)` is the one place a `Measurements` record is built; the baseline, every
trial, `apply` and `evaluate` all go through it, and `Measurements.metrics()` is the one flat form that
metrics.json, trial results and the tables share.

Decisions: what is timed is a torch module or a model `Deployed` in another runtime (an ONNX Runtime session,
`orchestrator.runtime`); both become a zero-argument forward on fixed inputs, so one timing implementation
(`time_latency`, `time_paired`) serves every target. A deployed model's size is its runtime's file; the
checkpoint's own bytes are kept beside it as `checkpoint_bytes`. FLOPs are always the torch model's. The clock is
injectable (`clock=`, default `time.perf_counter`) so that tests check the arithmetic of timing with exact, fake
durations instead of asserting how fast the machine happens to be.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.artifacts.store import measure_artifact
from techniques.inputs import Inputs, batch_length, call_model, device_of, first_rows

# Within one process the per-round ratios of a stable pair can agree to 0.5%, yet the same pair re-timed in
# another process (other memory layout, other moment) moved by up to ~1% on the digits CNN and more under load
# (bench/deploy.py re-times every Pareto checkpoint as `orchestrator evaluate` does): a recorded spread is
# therefore never narrower than this fraction either side of its median, and smaller changes are no measurable
# change.
REPRODUCIBILITY = 0.05
# A paired block of forwards lasts at least this long: 20 forwards of a 30 us model took 0.6 ms, so one busy
# moment of the machine (a few ms) covered most of a pairing's rounds and moved its ratio by 15%; blocks this
# long spread the rounds over a third of a second, and the median of rounds leaves such a moment out.
MIN_BLOCK_S = 0.025


class Deployed(Protocol):
    """A model as a runtime other than PyTorch runs it (e.g. `orchestrator.runtime.OnnxSession`)."""

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
class Environment:
    """Where a measurement was taken (`runtime`: what ran the model)."""

    device: str
    torch_version: str
    threads: int
    runtime: str = f"torch {torch.__version__}"

    @classmethod
    def current(cls, device: torch.device | str, deployed: Deployed | None = None) -> Environment:
        if deployed is None:
            return cls(str(device), torch.__version__, torch.get_num_threads())
        return cls("cpu", torch.__version__, deployed.threads, deployed.runtime)


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


@dataclass(frozen=True)
class Measurements:
    """Everything measured on one model as deployed (its speed beside the baseline, when timed so)."""

    size_bytes: int
    latency: Latency
    params: int
    nonzero_params: int
    flops: int
    environment: Environment
    paired: tuple[Latency, Speedup] | None = None  # the baseline's latency in the same rounds, and the ratio
    target: str = "torch"  # the deployment target size and latency are of
    checkpoint_bytes: int | None = None  # the checkpoint's deployable files (= size_bytes for torch)

    def compression_ratio(self, reference: Measurements) -> float:
        return reference.size_bytes / self.size_bytes

    def speedup(self, reference: Measurements) -> float:
        """The paired ratio when the model was timed beside its baseline, else the ratio of medians."""
        if self.paired is not None:
            return self.paired[1].median
        return reference.latency.median_ms / self.latency.median_ms

    def metrics(self, reference: Measurements | None = None) -> dict[str, Any]:
        """The flat, JSON-safe form (ratios to `reference` when given) that every record of a model uses."""
        if reference is not None and reference.target != self.target:
            raise ValueError(f"a {self.target} measurement compared with a {reference.target} reference")
        flat: dict[str, Any] = {
            "target": self.target,
            "size_bytes": self.size_bytes,
            "checkpoint_bytes": self.size_bytes if self.checkpoint_bytes is None else self.checkpoint_bytes,
            "latency_ms": self.latency.median_ms,
            "latency_p10_ms": self.latency.p10_ms,
            "latency_p90_ms": self.latency.p90_ms,
            "latency_runs": self.latency.runs,
            "latency_batch_size": self.latency.batch_size,
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "flops": self.flops,
        }
        if reference is not None:
            flat["compression_ratio"] = self.compression_ratio(reference)
            flat["speedup"] = self.speedup(reference)
            flat["relative_latency"] = 1.0 / flat["speedup"]  # the latency objective: lower is faster
        if self.paired is not None:
            baseline, speedup = self.paired
            flat |= {"speedup_low": speedup.low, "speedup_high": speedup.high, "speedup_rounds": speedup.rounds}
            flat["baseline_latency_ms"] = baseline.median_ms
        return {**flat, **asdict(self.environment)}


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


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model as it is, packed layers counted by their logical weights."""
    total = nonzero = 0
    for module in model.modules():
        tensors = [p for _, p in module.named_parameters(recurse=False)]
        if hasattr(module, "dense_weight"):
            tensors = [cast(Any, module).dense_weight()] + [b for b in [getattr(module, "bias", None)] if b is not None]
        for tensor in tensors:
            total += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor.detach()).item())
    return total, nonzero


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(model: nn.Module, example_inputs: Inputs) -> int:
    """Floating-point operations of one forward pass on `example_inputs` (a multiply-add counts as 2)."""
    model.eval()
    # Integer GEMMs (torch._int_mm) are multiply-adds too; the stock counter does not know them.
    custom = {torch.ops.aten._int_mm: _int_mm_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        call_model(model, example_inputs)
    return int(counter.get_total_flops())


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


def latency_range(observed_ms: Iterable[Any]) -> tuple[float, float] | None:
    """How fast and how slow a model ran, timed at different moments (None without any): the fastest (a quiet
    machine, which it returns to: on this VM the text baseline ran at 1.24 ms half an hour after a run whose
    timings were 1.56-2.52 ms between their 5th and 95th percentiles) and the 95th percentile of the rest (a busy
    one; the rarest slow moments left out)."""
    observed = sorted(ms for ms in observed_ms if isinstance(ms, int | float) and math.isfinite(ms) and ms > 0)
    return (observed[0], _percentile(observed, 0.95)) if observed else None


def drift_widened(low: float, high: float, baseline_ms: float, moved: tuple[float, float]) -> tuple[float, float]:
    """A speedup's spread (`low`, `high`, timed beside a baseline that ran at `baseline_ms`) widened by how far
    that baseline's own latency moved when timed at other moments on this machine (`moved`: its `latency_range`):
    the ratios the model would have had beside the baseline at its faster and slower times.

    Paired rounds cancel what both models feel alike, not a change that slows only one of them: on a VM whose
    L3 cache is shared with other guests, the digits CNN at batch 256 ran at 9.2 or 13.6 ms per forward,
    depending on the moment, while its 1 ms compressed model did not move, so a ratio re-timed minutes later
    moved by 30% (docs/BENCHMARKS.md, "Deployment")."""
    if not baseline_ms > 0:
        return low, high
    faster, slower = moved
    return low * min(1.0, faster / baseline_ms), high * max(1.0, slower / baseline_ms)


def measure(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    base: nn.Module | None = None,
    beside: Timed | None = None,
    deployed: Deployed | None = None,
    warmup: int = 10,
    runs: int = 50,
    clock: Clock = time.perf_counter,
) -> Measurements:
    """Size (the artifact written against the `base` architecture), latency, parameters and FLOPs of `model`;
    with `beside` (its baseline), the latency is timed in rounds paired with it and the speedup kept.

    With `deployed` (the model in another runtime), size and latency are that artifact's and that runtime's,
    and `beside` is the baseline deployed the same way; parameters and FLOPs stay the torch model's."""
    params, nonzero = count_weights(model)
    timed: Timed = model if deployed is None else deployed
    paired = None
    if beside is None:
        latency = time_latency(timed, example_inputs, warmup=warmup, runs=runs, clock=clock)
    else:
        latency, baseline, speedup = time_paired(timed, beside, example_inputs, clock=clock)
        paired = (baseline, speedup)
    checkpoint_bytes = measure_artifact(model, base)
    return Measurements(
        size_bytes=checkpoint_bytes if deployed is None else deployed.size_bytes,
        latency=latency,
        params=params,
        nonzero_params=nonzero,
        flops=count_flops(model, first_rows(example_inputs, 1)),
        environment=Environment.current(device_of(example_inputs), deployed),
        paired=paired,
        target="torch" if deployed is None else deployed.target,
        checkpoint_bytes=checkpoint_bytes,
    )

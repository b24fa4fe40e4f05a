"""The `Measurements` record of one model as deployed, and `measure`, the one place it is built.

The baseline, every trial, `apply` and `evaluate` all go through `measure(model, inputs, base=...)`, and
`Measurements.metrics()` is the one flat form that metrics.json, trial results and the tables share.

Decisions: a deployed model's size is its runtime's file; the checkpoint's own bytes are kept beside it as
`checkpoint_bytes`. FLOPs and parameters are always the torch model's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.measure.size import count_flops, count_weights, measure_artifact
from orchestrator.measure.timing import Clock, Deployed, Latency, Speedup, Timed, time_latency, time_paired
from techniques.tools.inputs import Inputs, device_of, first_rows


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

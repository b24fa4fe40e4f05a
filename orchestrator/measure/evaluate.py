"""Re-measuring what exists: a workload's baseline, or a saved checkpoint reloaded through its workload.

Decisions: a checkpoint is verified in full (every checksum, every document's schema) before its
workload is even resolved, and the workload comes from the built-in names or the caller (`--workload`):
nothing a checkpoint names is ever imported; measurements go through `reference.measure_on`, like every
trial's. A checkpoint is re-measured for the deployment target and at the latency batch size its metrics
record (unless told otherwise): for onnxruntime it is exported again and timed beside the baseline's fp32 ONNX
session, so the speedup is comparable with the one the search recorded; and with the torch thread count they
record (at most this machine's cores), as the search re-timed its Pareto checkpoints. Both speeds are paired
ratios (the median of per-round ratios, 10th–90th percentile spread, at least ±5%), and the result says whether
the two agree: whether their spreads overlap. Nothing widens a recorded spread: a paired ratio already cancels
what the machine does to both models alike. Metrics are scored as trials score
them (`reference.scores`): for onnxruntime, the ONNX session's validation and test metrics, PyTorch's beside them.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from orchestrator.artifacts import store
from orchestrator.device import resolve_device
from orchestrator.measure.reference import compressed_metrics, measure_on, measure_reference, scores
from orchestrator.measure.targets import DEFAULT_TARGET, check_target, deploy
from orchestrator.measure.timing import torch_threads
from orchestrator.workloads import Workload, resolve_workload


def measure_baseline(
    workload: Workload, *, device: torch.device, latency_batch_size: int = 1, target: str = DEFAULT_TARGET
) -> dict[str, Any]:
    """Every measurement of the trained baseline for the deployment `target`, test metric included (scored as
    the target deploys it, as trials score)."""
    model = workload.load_baseline().to(device)
    deployed = deploy(model, workload, check_target(target))
    return {
        "workload": workload.name,
        "metric": workload.metric_name,
        **scores(model, workload, device, deployed, ("validation", "test")),
        **measure_on(model, workload, device, latency_batch_size, deployed=deployed).metrics(),
    }


def _recorded(metrics: dict[str, Any], key: str, default: Any) -> Any:
    """A setting the checkpoint's metrics record, when it is of the default's kind (a count: at least 1),
    else `default`."""
    value = metrics.get(key)
    if type(value) is not type(default) or (isinstance(value, int) and value < 1):
        return default
    return value


def evaluate_checkpoint(
    source: str,
    *,
    workload: str | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    latency_batch_size: int | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """Validation and test metric, artifact bytes, latency, parameters and FLOPs of a checkpoint, for the
    deployment `target` and `latency_batch_size` its metrics record when not given (torch and 1 when they
    record none)."""
    torch_device = resolve_device(device)
    verified = store.read_verified(source)
    target = check_target(target or _recorded(verified.metrics, "target", DEFAULT_TARGET))
    latency_batch_size = latency_batch_size or _recorded(verified.metrics, "latency_batch_size", 1)
    work = resolve_workload(workload or store.recorded_workload(verified.manifest), data_dir=data_dir, weights=weights)
    checkpoint = store.load_verified(verified, work)
    model = checkpoint.model.to(torch_device)
    baseline = work.load_baseline().to(torch_device)
    threads = min(_recorded(verified.metrics, "threads", 0), os.cpu_count() or 1)
    with torch_threads(threads):  # re-timed with the threads the recorded speed was timed with
        reference = measure_reference(
            work, baseline, torch_device, latency_batch_size=latency_batch_size, target=target
        )
        measured = compressed_metrics(
            model, work, torch_device, reference, baseline, latency_batch_size, policy=checkpoint.policy,
            splits=("validation", "test"),
        )  # fmt: skip
    return {
        "metric": work.metric_name,
        "recorded_validation": checkpoint.metrics.get("validation"),
        **measured,
        **against_recorded(verified.metrics, measured),
        "techniques": checkpoint.policy.techniques(),
    }


SPREAD_KEYS = ("speedup_low", "speedup", "speedup_high")


def against_recorded(recorded: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """The speedup the checkpoint recorded (`[low, median, high]`) and whether this re-timing agrees with it:
    whether the two paired spreads overlap. Nothing when either has no spread, or they were timed for another
    target or batch size."""
    spreads = [[side.get(key) for key in SPREAD_KEYS] for side in (recorded, measured)]
    same = all(recorded.get(key) == measured.get(key) for key in ("target", "latency_batch_size"))
    if not same or not all(isinstance(value, int | float) for spread in spreads for value in spread):
        return {}
    (low, _, high), (now_low, _, now_high) = ([float(value or 0) for value in spread] for spread in spreads)
    return {"recorded_speedup": spreads[0], "agrees": now_low <= high and low <= now_high}

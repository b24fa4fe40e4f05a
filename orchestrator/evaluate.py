"""Re-measuring what exists: a workload's baseline, or a saved checkpoint reloaded through its workload.

Decisions: a checkpoint is verified in full (every checksum, every document's schema) before its
workload is even resolved, and the workload comes from the built-in names or the caller (`--workload`):
nothing a checkpoint names is ever imported; measurements go through `executor.measure_on`, like every
trial's.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.artifacts import store
from orchestrator.device import resolve_device
from orchestrator.executor import compressed_metrics, measure_on, measure_reference
from orchestrator.workloads import BUILTIN, Workload, resolve_workload


def measure_baseline(workload: Workload, *, device: torch.device, latency_batch_size: int = 1) -> dict[str, Any]:
    """Every measurement of the trained baseline, test metric included."""
    model = workload.load_baseline().to(device)
    return {
        "workload": workload.name,
        "metric": workload.metric_name,
        "validation": workload.evaluate(model, "validation", device),
        "test": workload.evaluate(model, "test", device),
        **measure_on(model, workload, device, latency_batch_size).metrics(),
    }


def recorded_workload(manifest: dict[str, Any]) -> str:
    """The built-in workload a verified manifest names; any other name must come from the user."""
    name = manifest["workload"]
    if name not in BUILTIN:
        raise store.CheckpointError(
            f"the checkpoint is of workload {name!r}, which is not built in; "
            "pass --workload package.module:function yourself to load it"
        )
    return name


def evaluate_checkpoint(
    source: str,
    *,
    workload: str | None = None,
    data_dir: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    latency_batch_size: int = 1,
) -> dict[str, Any]:
    """Validation and test metric, artifact bytes, latency, parameters and FLOPs of a checkpoint."""
    torch_device = resolve_device(device)
    verified = store.read_verified(source)
    work = resolve_workload(workload or recorded_workload(verified.manifest), data_dir=data_dir, weights=weights)
    checkpoint = store.load_verified(verified, work)
    model = checkpoint.model.to(torch_device)
    baseline = work.load_baseline().to(torch_device)
    reference = measure_reference(work, baseline, torch_device, latency_batch_size=latency_batch_size)
    return {
        "metric": work.metric_name,
        "validation": work.evaluate(model, "validation", torch_device),
        "test": work.evaluate(model, "test", torch_device),
        "recorded_validation": checkpoint.metrics.get("validation"),
        **compressed_metrics(
            model, work, torch_device, reference, baseline, latency_batch_size, policy=checkpoint.policy
        ),
        "techniques": checkpoint.policy.techniques(),
    }

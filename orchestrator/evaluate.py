"""Re-measuring what exists: a workload's baseline, or a saved checkpoint reloaded through its workload.

Decisions: a checkpoint is verified (every checksum) before its workload is even resolved, and the
workload comes from the built-in names or the caller (`--workload`), never from code the checkpoint
names; measurements go through `executor.measure_on`, like every trial's.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.artifacts import store
from orchestrator.device import resolve_device
from orchestrator.executor import compressed_metrics, measure_on, measure_reference
from orchestrator.workloads import Workload, resolve_workload


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
    manifest = store.read_manifest(source)
    work = resolve_workload(workload or str(manifest.get("workload", "")), data_dir=data_dir, weights=weights)
    checkpoint = store.load(source, work)
    model = checkpoint.model.to(torch_device)
    reference = measure_reference(
        work, work.load_baseline().to(torch_device), torch_device, latency_batch_size=latency_batch_size
    )
    return {
        "metric": work.metric_name,
        "validation": work.evaluate(model, "validation", torch_device),
        "test": work.evaluate(model, "test", torch_device),
        "recorded_validation": checkpoint.metrics.get("validation"),
        **compressed_metrics(model, work, torch_device, reference, latency_batch_size),
        "techniques": checkpoint.policy.techniques(),
    }

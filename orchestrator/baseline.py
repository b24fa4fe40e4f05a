"""Measure a workload's uncompressed baseline: metric, bytes on disk, latency, parameters, FLOPs."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.measure import measure_model
from orchestrator.store import measure_artifact
from orchestrator.workloads import Workload


def measure_baseline(
    workload: Workload, *, device: torch.device, latency_batch_size: int = 1, runs: int = 50
) -> dict[str, Any]:
    """Every measurement of the trained baseline, test metric included."""
    model = workload.load_baseline().to(device)
    inputs = workload.example_inputs(latency_batch_size, device)
    metrics = measure_model(model, inputs, runs=runs)
    # the same artifact a checkpoint ships (weights + structure record), so sizes compare across commands
    metrics["size_bytes"] = measure_artifact(model, workload.build_model())
    return {
        "workload": workload.name,
        "metric": workload.metric_name,
        "validation": workload.evaluate(model, "validation", device),
        "test": workload.evaluate(model, "test", device),
        **metrics,
    }


def format_measurements(metrics: dict[str, Any]) -> str:
    """A small aligned table for the console."""
    rows = [
        (f"test {metrics['metric']}", f"{metrics['test']:.4f}"),
        (f"validation {metrics['metric']}", f"{metrics['validation']:.4f}"),
        ("size on disk", f"{metrics['size_bytes']:,} bytes"),
        (
            "latency (median)",
            f"{metrics['latency_ms']:.3f} ms  (batch {metrics['latency_batch_size']}, "
            f"p90 {metrics['latency_p90_ms']:.3f} ms, {metrics['latency_runs']} runs)",
        ),
        ("FLOPs (per example)", f"{metrics['flops']:,}"),
        ("parameters", f"{metrics['params']:,}  ({metrics['nonzero_params']:,} non-zero)"),
        ("measured on", f"{metrics['device']}, torch {metrics['torch_version']}, {metrics['threads']} threads"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

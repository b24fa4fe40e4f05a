"""Re-measuring a saved checkpoint: reload it through its workload and measure it as deployed."""

from __future__ import annotations

from typing import Any

from orchestrator import store
from orchestrator.device import resolve_device
from orchestrator.executor import measure_reference
from orchestrator.measure import Environment, count_flops, count_weights, time_latency
from orchestrator.workloads import resolve_workload
from techniques.finalize import kernel_report


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
    spec = workload or manifest.get("workload", "")
    work = resolve_workload(spec, data_dir=data_dir, weights=weights)
    checkpoint = store.load(source, work)
    model = checkpoint.model.to(torch_device)
    reference = measure_reference(work, work.load_baseline().to(torch_device), torch_device)
    inputs = work.example_inputs(latency_batch_size, torch_device)
    size = sum(manifest["files"][name]["bytes"] for name in manifest["artifact_files"])
    params, nonzero = count_weights(model)
    latency = time_latency(model, inputs)
    return {
        "metric": work.metric_name,
        "validation": work.evaluate(model, "validation", torch_device),
        "test": work.evaluate(model, "test", torch_device),
        "recorded_validation": checkpoint.metrics.get("validation"),
        "size_bytes": size,
        "latency_ms": latency.median_ms,
        "params": params,
        "nonzero_params": nonzero,
        "flops": count_flops(model, inputs[:1]),
        "baseline_validation": reference.metric,
        "compression_ratio": reference.size_bytes / size,
        "speedup": reference.latency_ms / latency.median_ms,
        "kernels": kernel_report(model),
        "techniques": checkpoint.policy.techniques(),
        **vars(Environment.current(torch_device)),
    }

"""Console text for measured models: a checkpoint's headline numbers, a baseline's measurements."""

from __future__ import annotations

from typing import Any


def format_result(metrics: dict[str, Any], where: str) -> str:
    """The headline numbers of a compressed model, against its baseline."""
    lines = [
        f"checkpoint           {where}",
        f"validation {metrics['metric']:<9} {metrics['validation']:.4f}"
        f"  (baseline {metrics['baseline_validation']:.4f})",
    ]
    if "test" in metrics:
        lines.append(f"test {metrics['metric']:<15} {metrics['test']:.4f}")
    lines += _deployed(metrics)
    lines += [
        f"size on disk         {metrics['size_bytes']:,} bytes  ({metrics['compression_ratio']:.1f}x smaller)",
        f"latency (median)     {metrics['latency_ms']:.3f} ms  ({_speed(metrics)})",
        *_recorded(metrics),
        f"parameters           {metrics['params']:,}  ({metrics['nonzero_params']:,} non-zero)",
        f"FLOPs (per example)  {metrics['flops']:,}",
        f"measured on          {metrics['device']}, {_runtime(metrics)}, {metrics['threads']} threads",
    ]
    return "\n".join(lines)


def _deployed(metrics: dict[str, Any]) -> list[str]:
    """On a deployment target the scores above are the deployed artifact's: PyTorch's and the export check beside."""
    if metrics.get("torch_validation") is None:
        return []
    diff, bound = metrics.get("export_max_abs_diff"), metrics.get("export_tolerance")
    check = "within" if metrics.get("export_check_passed") else "BEYOND"
    gap = "not finite" if diff is None else f"{diff:.3g}"
    return [
        f"PyTorch validation   {metrics['torch_validation']:.4f}  (the scores above are the exported model's)",
        f"export difference    {gap}, {check} tolerance {bound}",
    ]


def _speed(metrics: dict[str, Any]) -> str:
    """The speed against the baseline in words, with the spread of the paired rounds when they were timed."""
    from orchestrator.report import fmt_speed

    low, high = metrics.get("speedup_low"), metrics.get("speedup_high")
    spread = (low, high) if low is not None and high is not None else None
    words = fmt_speed(metrics["speedup"], spread)
    if spread is None:
        return words
    return f"{words}: {metrics['speedup']:.2f}x, {low:.2f}–{high:.2f}x over {metrics['speedup_rounds']} paired rounds"


def _recorded(metrics: dict[str, Any]) -> list[str]:
    """A re-measured checkpoint's line on the speed it recorded, when it recorded one for this target."""
    if "recorded_speedup" not in metrics:
        return []
    low, median, high = metrics["recorded_speedup"]
    verdict = "the two spreads overlap: they agree" if metrics["agrees"] else "the two spreads DISAGREE"
    return [f"recorded speedup     {median:.2f}x, {low:.2f}–{high:.2f}x; {verdict}"]


def format_measurements(metrics: dict[str, Any]) -> str:
    """A baseline's measurements as a small aligned table."""
    rows = [
        (f"test {metrics['metric']}", f"{metrics['test']:.4f}"),
        (f"validation {metrics['metric']}", f"{metrics['validation']:.4f}"),
        ("size on disk", f"{metrics['size_bytes']:,} bytes"),
        (
            "latency (median)",
            f"{metrics['latency_ms']:.3f} ms  (batch {metrics['latency_batch_size']}, "
            f"p10–p90 {metrics['latency_p10_ms']:.3f}–{metrics['latency_p90_ms']:.3f} ms, "
            f"{metrics['latency_runs']} runs)",
        ),
        ("FLOPs (per example)", f"{metrics['flops']:,}"),
        ("parameters", f"{metrics['params']:,}  ({metrics['nonzero_params']:,} non-zero)"),
        ("measured on", f"{metrics['device']}, {_runtime(metrics)}, {metrics['threads']} threads"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _runtime(metrics: dict[str, Any]) -> str:
    """The runtime the latency was measured in (ONNX Runtime for --target onnxruntime, else torch)."""
    return str(metrics.get("runtime") or f"torch {metrics['torch_version']}")

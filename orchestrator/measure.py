"""Honest measurements of a model as deployed: bytes on disk, latency, parameters, non-zeros, FLOPs."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.weights import artifact_bytes


@dataclass(frozen=True)
class Environment:
    """Where a measurement was taken."""

    device: str
    torch_version: str
    threads: int

    @classmethod
    def current(cls, device: torch.device | str) -> Environment:
        return cls(str(device), torch.__version__, torch.get_num_threads())


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    warmup: int
    batch_size: int


def _dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The logical weight of a layer: packed layers expose `dense_weight()`, plain ones `.weight`."""
    if hasattr(module, "dense_weight"):
        return module.dense_weight()
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model as it is, packed layers counted by their logical weights."""
    total = nonzero = 0
    for module in model.modules():
        tensors = [p for _, p in module.named_parameters(recurse=False)]
        if hasattr(module, "dense_weight"):
            tensors = [module.dense_weight()] + [b for b in [getattr(module, "bias", None)] if b is not None]
        for tensor in tensors:
            total += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor.detach()).item())
    return total, nonzero


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Floating-point operations of one forward pass on `example_inputs` (a multiply-add counts as 2)."""
    model.eval()
    # Integer GEMMs (torch._int_mm) are multiply-adds too; the stock counter does not know them.
    custom = {torch.ops.aten._int_mm: _int_mm_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(example_inputs)
    return int(counter.get_total_flops())


def time_latency(model: nn.Module, example_inputs: torch.Tensor, *, warmup: int = 10, runs: int = 50) -> Latency:
    """Median wall time of `runs` forward passes after `warmup`, in inference mode, on the inputs' device."""
    model.eval()
    device = example_inputs.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(example_inputs)
        sync()
        for _ in range(runs):
            start = time.perf_counter()
            model(example_inputs)
            sync()
            times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return Latency(statistics.median(times), p90, runs, warmup, int(example_inputs.shape[0]))


def measure_model(
    model: nn.Module, example_inputs: torch.Tensor, *, warmup: int = 10, runs: int = 50
) -> dict[str, object]:
    """Size, latency, parameters, non-zeros and FLOPs of `model`, with the environment they were taken in."""
    params, nonzero = count_weights(model)
    latency = time_latency(model, example_inputs, warmup=warmup, runs=runs)
    flops = count_flops(model, example_inputs[:1])
    env = Environment.current(example_inputs.device)
    return {
        "size_bytes": artifact_bytes(model),
        "latency_ms": latency.median_ms,
        "latency_p90_ms": latency.p90_ms,
        "latency_runs": latency.runs,
        "latency_batch_size": latency.batch_size,
        "params": params,
        "nonzero_params": nonzero,
        "flops": flops,
        **asdict(env),
    }

"""The reference a model is measured against, and the metrics record of a model measured against it.

`measure_reference` measures the uncompressed baseline once; `compressed_metrics` scores and measures a finalized
model as the reference's target deploys it, with ratios to the baseline timed beside it now. Trials, `apply`,
`evaluate` and the baseline all score through `scores` and measure through `measure_on`.

Decisions: the deployment target (`torch` | `onnxruntime`, `targets`) belongs to the `Reference`: the baseline
is measured for it first, and every model measured against that reference is deployed and timed the same way,
beside the baseline as that target runs it (for onnxruntime, the baseline's fp32 ONNX session, exported once and
re-timed beside every model). A model's size is its artifact written against the base architecture of the policy
that made it (`store.base_architecture`), as its checkpoint will be.

Decisions: what a target deploys is what is scored (`scores`): for onnxruntime the validation metric is the ONNX
session's (baseline and candidate alike), the PyTorch model's is kept beside it (`torch_validation`), and the
export check's difference is a measurement (`export_max_abs_diff`, `export_check_passed`), never a failed trial.

Decisions: layers the baseline's outputs never depend on (`Workload.unused_layers`: BERT's pooler under a
module reading hidden states) are found once with the reference, said once per process, and left out of the
kernel report (an export has no graph for them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orchestrator.artifacts.store import base_architecture
from orchestrator.measure.measurements import Measurements, measure
from orchestrator.measure.targets import DEFAULT_TARGET, OnnxSession, deploy
from orchestrator.measure.timing import Timed
from orchestrator.policy import Policy
from orchestrator.workloads import Workload
from techniques.packed.finalize import kernel_report


@dataclass(frozen=True)
class Reference:
    """The baseline's validation metric and measurements for a deployment target, taken in the same process so
    ratios compare like with like; `deployed` is the baseline as that target runs it (None for torch)."""

    metric: float
    measurements: Measurements
    deployed: OnnxSession | None = field(default=None, repr=False, compare=False)
    unused_layers: tuple[str, ...] = ()  # layers the baseline's outputs never depend on

    @property
    def target(self) -> str:
        return self.measurements.target

    def beside(self, baseline: nn.Module) -> Timed:
        """What a model measured against this reference is timed beside: the baseline as the target runs it."""
        return baseline if self.deployed is None else self.deployed


def measure_reference(
    workload: Workload,
    baseline: nn.Module,
    device: torch.device,
    *,
    latency_batch_size: int = 1,
    target: str = DEFAULT_TARGET,
) -> Reference:
    """Measure the uncompressed baseline exactly as `apply` measures a compressed model, for `target`."""
    unused = tuple(workload.unused_layers(baseline))
    _say_unused(workload, unused)
    deployed = deploy(baseline, workload, target)
    measured = measure_on(baseline, workload, device, latency_batch_size, deployed=deployed)
    return Reference(
        metric=scores(baseline, workload, device, deployed)["validation"],
        measurements=measured,
        deployed=deployed,
        unused_layers=unused,
    )


_SAID: set[str] = set()  # workload fingerprints whose unused layers this process has named


def _say_unused(workload: Workload, unused: tuple[str, ...]) -> None:
    """Name a workload's unused layers on stderr, once per process."""
    if unused and workload.fingerprint not in _SAID:
        _SAID.add(workload.fingerprint)
        print(
            f"note: {workload.name}: the model's outputs never depend on layer(s) {', '.join(unused)}; "
            "they are left alone (no kernel reported, absent from an ONNX export)",
            file=sys.stderr,
            flush=True,
        )


def scores(
    model: nn.Module,
    workload: Workload,
    device: torch.device,
    deployed: OnnxSession | None,
    splits: tuple[str, ...] = ("validation",),
) -> dict[str, Any]:
    """The metric on each split of what the target deploys: the model itself, or (`deployed`) its artifact,
    with the PyTorch model's beside it (`torch_<split>`) and the export check's difference to PyTorch."""
    found: dict[str, Any] = {}
    for split in splits:
        metric = workload.evaluate(model, split, device)
        if deployed is None:
            found[split] = metric
        else:
            found |= {split: deployed.evaluate(workload, split), f"torch_{split}": metric}
    return found if deployed is None else {**found, **deployed.check_metrics()}


def measure_on(
    model: nn.Module,
    workload: Workload,
    device: torch.device,
    latency_batch_size: int = 1,
    beside: Timed | None = None,
    *,
    policy: Policy | None = None,
    target: str = DEFAULT_TARGET,
    deployed: OnnxSession | None = None,
) -> Measurements:
    """The model measured as a workload's artifact (size against the base architecture of the `policy` that
    made it: the workload's model, or its student), on `device`; timed in paired rounds beside `beside` (the
    baseline as the target runs it) when given. For a `target` other than torch the model is deployed there
    first (unless `deployed` already is it), and size and latency are of that artifact in that runtime."""
    if deployed is None:
        deployed = deploy(model, workload, target)
    inputs = workload.example_inputs(latency_batch_size, device)
    base = workload.build_model() if policy is None else base_architecture(policy, workload)
    return measure(model, inputs, base=base, beside=beside, deployed=deployed)


def preview_metrics(
    model: nn.Module,
    workload: Workload,
    device: torch.device,
    reference: Reference,
    baseline: nn.Module,
    latency_batch_size: int,
    policy: Policy,
) -> dict[str, Any]:
    """The measurements (no scores) of a finalized preview of a model still being fine-tuned, with ratios to the
    reference: what its size, latency and FLOPs will be, timed beside the `baseline` as the target runs it."""
    beside = reference.beside(baseline)
    measured = measure_on(
        model, workload, device, latency_batch_size, beside=beside, policy=policy, target=reference.target
    )
    return measured.metrics(reference.measurements)


def compressed_metrics(
    model: nn.Module,
    workload: Workload,
    device: torch.device,
    reference: Reference,
    baseline: nn.Module,
    latency_batch_size: int = 1,
    *,
    policy: Policy | None = None,
    splits: tuple[str, ...] = ("validation",),
) -> dict[str, Any]:
    """The metrics record of a finalized model: its scores on `splits` and measurements as the reference's
    target deploys it (`scores`), with ratios to the baseline (the speedup timed beside the `baseline` as that
    target runs it, now), the baseline's own numbers, and which kernel each layer it uses runs on. `policy` (the
    one that made the model) picks the base architecture its size is written against."""
    deployed = deploy(model, workload, reference.target)
    beside = reference.beside(baseline)
    measured = measure_on(model, workload, device, latency_batch_size, beside=beside, policy=policy, deployed=deployed)
    unused = reference.unused_layers
    return {
        **scores(model, workload, device, deployed, splits),
        "baseline_validation": reference.metric,
        "baseline_size_bytes": reference.measurements.size_bytes,
        **measured.metrics(reference.measurements),
        "kernels": {k: v for k, v in kernel_report(model).items() if not _within(k, unused)},
    }


def _within(name: str, layers: tuple[str, ...]) -> bool:
    """Whether module `name` is one of `layers` or inside one (a factored layer's children)."""
    return any(name == layer or name.startswith(f"{layer}.") for layer in layers)

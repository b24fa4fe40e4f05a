"""The policy executor: one deterministic path from (policy, workload, seed) to a measured compressed model.

Search trials, `python -m orchestrator apply`, and re-materialising a Pareto point all call `apply`.

Decisions: a policy's base architecture is the workload's `build_model()`, or its `build_student(width)` when
the policy starts with a student step (`store.base_architecture`); the policy is validated against it, and
the model's size is its artifact written against it, as its checkpoint will be.

Decisions: the deployment target (`torch` | `onnxruntime`, `orchestrator.runtime`) belongs to the `Reference`:
the baseline is measured for it first, and every model measured against that reference is deployed and timed
the same way, beside the baseline as that target runs it (for onnxruntime, the baseline's fp32 ONNX session,
exported once and re-timed beside every model).

Decisions: what a target deploys is what is scored (`scores`): for onnxruntime the validation metric is the ONNX
session's (baseline and candidate alike), the PyTorch model's is kept beside it (`torch_validation`), and the
export check's difference is a measurement (`export_max_abs_diff`, `export_check_passed`), never a failed trial.
Trials, `apply`, `evaluate` and the baseline all score through `scores`.

Decisions: layers the baseline's outputs never depend on (`Workload.unused_layers`: BERT's pooler under a
module reading hidden states) are found once with the reference, said once per process, and left out of the
kernel report (an export has no graph for them).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import techniques
from orchestrator import latency_log
from orchestrator.artifacts.store import base_architecture
from orchestrator.measure import Measurements, Timed, measure
from orchestrator.policy import Policy, PolicyError, validate_for_model
from orchestrator.runtime import DEFAULT_TARGET, OnnxSession, check_target, deploy
from orchestrator.workloads import Workload
from techniques.finalize import finalize, finalized_copy, kernel_report
from techniques.inputs import Inputs, to_device
from techniques.student import require_fine_tune

TRACE_BATCH = 2


@dataclass(frozen=True)
class Reference:
    """The baseline's validation metric and measurements for a deployment target, taken in the same process so
    ratios compare like with like; `deployed` is the baseline as that target runs it (None for torch)."""

    metric: float
    measurements: Measurements
    deployed: OnnxSession | None = field(default=None, repr=False, compare=False)
    timings: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # its `latency_log` entry
    unused_layers: tuple[str, ...] = ()  # layers the baseline's outputs never depend on

    @property
    def target(self) -> str:
        return self.measurements.target

    def beside(self, baseline: nn.Module) -> Timed:
        """What a model measured against this reference is timed beside: the baseline as the target runs it."""
        return baseline if self.deployed is None else self.deployed


@dataclass
class WorkloadContext(techniques.Context):
    """The technique context of a workload: `run` reduces outputs with the workload's `output_fn`, given the
    batch when it asks for it (mean pooling over the attention mask), which `Context.run` cannot pass."""

    workload: Workload | None = None

    def run(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        if self.workload is None:
            return super().run(model, inputs)
        device = next((p.device for p in model.parameters()), self.device)
        return self.workload.forward(model, to_device(inputs, device))


@dataclass
class CompressedModel:
    model: nn.Module
    policy: Policy
    metrics: dict[str, Any]
    notes: list[dict[str, Any]] = field(default_factory=list)


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
    timings = latency_log.describe(
        baseline, target=target, batch_size=latency_batch_size, threads=measured.environment.threads,
        device=measured.environment.device,
    )  # fmt: skip
    latency_log.append(timings, [measured.latency.median_ms])
    return Reference(
        metric=scores(baseline, workload, device, deployed)["validation"],
        measurements=measured,
        deployed=deployed,
        timings=timings,
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


def make_context(
    workload: Workload,
    teacher: nn.Module,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None,
) -> techniques.Context:
    """The technique context: data through the workload (outputs reduced by it), validation as the only metric
    the chain sees."""
    return WorkloadContext(
        workload=workload,
        example_inputs=workload.example_inputs(TRACE_BATCH, device),
        device=device,
        seed=seed,
        calibration=lambda: (x for x, _ in workload.batches("calibration", device=device)),
        train_batches=lambda epoch: workload.batches("train", shuffle_seed=seed * 10_007 + epoch, device=device),
        task_loss=workload.loss_fn,
        distill_loss=workload.distill_loss,
        evaluate=lambda model: workload.evaluate(model, "validation", device),
        teacher=teacher,
        on_epoch=on_epoch,
        build_student=workload.build_student,
    )


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
    if reference.timings is not None and measured.paired is not None:
        latency_log.append(reference.timings, [measured.paired[0].median_ms])
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


def _checked_base(policy: Policy, workload: Workload) -> nn.Module:
    """The policy's base architecture, once the policy is known to fit the workload (a student needs the
    workload's `build_student` and a fine-tuning step after it)."""
    try:
        require_fine_tune(policy.steps)
        return base_architecture(policy, workload)
    except techniques.SpecError as exc:
        raise PolicyError(str(exc)) from None


def apply(
    policy: Policy,
    workload: Workload,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    baseline: nn.Module | None = None,
    reference: Reference | None = None,
    on_epoch: Callable[[int, float, dict[str, Any]], None] | None = None,
    latency_batch_size: int = 1,
    target: str = DEFAULT_TARGET,
) -> CompressedModel:
    """Apply the policy's steps in order, finalize (bake masks, pack weights), and measure the artifact for
    the deployment `target` (torch, or onnxruntime: the ONNX file and an ONNX Runtime session).

    `seed` defaults to the policy's. `baseline`/`reference` may be passed in to avoid reloading and
    re-measuring the baseline for every policy (the reference must be for `target`). `on_epoch(epoch,
    validation, artifact)` is called after each fine-tuning epoch; `artifact` holds the size/latency/FLOPs the
    final model will have (they are fixed before fine-tuning starts), so a search can report every objective
    at every epoch.
    """
    device = torch.device(device)
    seed = policy.seed if seed is None else seed
    check_target(target)
    validate_for_model(policy, _checked_base(policy, workload))  # before any training or loading
    teacher = (baseline if baseline is not None else workload.load_baseline()).to(device).eval()
    if reference is None:
        reference = measure_reference(workload, teacher, device, latency_batch_size=latency_batch_size, target=target)
    if reference.target != target:
        raise ValueError(f"a reference measured for {reference.target} cannot measure a model for {target}")

    torch.manual_seed(seed)
    model = copy.deepcopy(teacher)
    ctx = make_context(workload, teacher, seed, device, None)
    for index, step in enumerate(policy.steps, start=1):
        if on_epoch is not None and step.technique == "distillation":
            preview = finalized_copy(model).eval()
            beside = reference.beside(teacher)
            measured = measure_on(
                preview, workload, device, latency_batch_size, beside=beside, policy=policy, target=target
            )
            artifact = measured.metrics(reference.measurements)
            ctx.on_epoch = lambda epoch, value, artifact=artifact: on_epoch(epoch, value, artifact)
        try:
            model = techniques.apply_spec(model, step, ctx)
        except techniques.SpecError as exc:
            raise PolicyError(f"step {index} ({step.technique}): {exc}") from None
    model = finalize(model).eval()

    metrics = {
        "metric": workload.metric_name,
        **compressed_metrics(model, workload, device, reference, teacher, latency_batch_size, policy=policy),
        "techniques": policy.techniques(),
        "seed": seed,
    }
    return CompressedModel(model, policy, metrics, ctx.notes)

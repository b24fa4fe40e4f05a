"""The policy executor: one deterministic path from (policy, workload, seed) to a measured compressed model.

Search trials, `python -m orchestrator apply`, and re-materialising a Pareto point all call `apply`; it applies
the policy and asks `orchestrator.measure` for the measurements (the reference, the preview each fine-tuning epoch
reports, the final metrics record), so measuring is done one way everywhere.

Decisions: a policy's base architecture is the workload's `build_model()`, or its `build_student(width)` when
the policy starts with a student step (`store.base_architecture`); the policy is validated against it before any
training or loading, and the model's size is its artifact written against it, as its checkpoint will be.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import techniques
from orchestrator.artifacts.store import base_architecture
from orchestrator.measure import (
    DEFAULT_TARGET,
    Reference,
    check_target,
    compressed_metrics,
    measure_reference,
    preview_metrics,
)
from orchestrator.policy import Policy, PolicyError, validate_for_model
from orchestrator.workloads import Workload
from techniques.packed.finalize import finalize, finalized_copy
from techniques.student import require_fine_tune
from techniques.tools.inputs import Inputs, to_device

TRACE_BATCH = 2


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
        if on_epoch is not None and techniques.get(step.technique).fine_tunes:  # the step that owns training
            preview = finalized_copy(model).eval()
            artifact = preview_metrics(preview, workload, device, reference, teacher, latency_batch_size, policy)
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

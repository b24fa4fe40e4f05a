"""Sensitivity cells: one technique's value on one layer group alone, applied to the baseline and measured.

A cell's policy is the space's own (`SearchSpace.one_step_policy`), applied step by step with the executor's
technique context (`executor.make_context`: calibration data, the baseline as teacher), finalized as a trial
deploys it (masks baked, weights packed), with no fine-tuning. It is measured on the scored validation batches:
the workload's metric; the output error, Σ‖f(x) − f₀(x)‖² / Σ‖f₀(x)‖² against the baseline's outputs f₀ (a
continuous measure of the damage, where a metric on a few hundred examples moves in steps: ZeroQ ranks layers by
the KL of outputs, HAWQ by a Hessian-weighted perturbation, for the same reason); the bytes of the finalized
model's state (the tensors its artifact stores); and which modules' stored tensors changed.

Decisions: one Ray task per (technique, group), with a trial's resources, computes all its values (the workload
and the baseline's weights travel once, through the object store); without a running Ray the jobs run here. A
cell that raises, or whose metric is not finite, is kept with its failure and no measurements.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import techniques
from orchestrator.executor import make_context
from orchestrator.policy import Policy
from orchestrator.search.space import SearchSpace
from orchestrator.search.space_options import per_layer_of
from orchestrator.workloads import Workload
from techniques.packed.finalize import finalize
from techniques.tools.inputs import Inputs, to_device

Batches = list[tuple[Inputs, torch.Tensor]]


@dataclass(frozen=True)
class Measured:
    """What one cell measured (all None, with `failure`, when it could not be measured)."""

    metric: float | None
    output_error: float | None
    size_bytes: int | None
    touched: tuple[str, ...] = ()  # every module whose stored tensors changed (a structural change reaches further)
    failure: str | None = None


@dataclass(frozen=True, kw_only=True)
class Cell(Measured):
    """One technique's `value` on the layers of one group alone, and what it measured."""

    technique: str
    setting: str
    group: str
    layers: tuple[str, ...]
    value: Any

    @property
    def identity(self) -> tuple[str, tuple[str, ...], str]:
        """What a cached cell is found by: its technique, layers and value (not its group's name)."""
        return self.technique, self.layers, json.dumps(self.value)


@dataclass(frozen=True)
class Job:
    """The cells of one (technique, group): what one Ray task computes."""

    technique: str
    setting: str
    group: str
    layers: tuple[str, ...]
    values: tuple[Any, ...]
    policies: tuple[Policy, ...]

    def cells(self, measured: Sequence[Measured]) -> list[Cell]:
        return [
            Cell(
                **vars(m), technique=self.technique, setting=self.setting, group=self.group, layers=self.layers, value=v
            )
            for v, m in zip(self.values, measured, strict=True)
        ]

    def identity(self, value: Any) -> tuple[str, tuple[str, ...], str]:
        return self.technique, self.layers, json.dumps(value)


def jobs_of(space: SearchSpace) -> list[Job]:
    """One job per layer group of every technique with a per-layer setting, over its values but the off one."""
    jobs = []
    for name, groups in space.groups.items():
        per_layer = per_layer_of(techniques.get(name))
        values = tuple(v for v in space.choices[per_layer.setting] if v != per_layer.off)
        for group, layers in groups.items():
            if values:
                policies = tuple(space.one_step_policy(name, group, v) for v in values)
                jobs.append(Job(name, per_layer.setting, group, tuple(layers), values, policies))
    return jobs


def scored_batches(workload: Workload, examples: int) -> Batches:
    """The first whole validation batches holding at least `examples` examples (all of them when fewer), on CPU."""
    batches: Batches = []
    count = 0
    for inputs, targets in workload.batches("validation"):
        if count >= examples:
            break
        batches.append((inputs, targets))
        count += len(targets)
    return batches


def outputs(workload: Workload, model: nn.Module, batches: Batches, device: torch.device) -> list[torch.Tensor]:
    """The model's outputs (as the workload reduces them) on each batch, on CPU (eval mode, no gradients)."""
    model.eval()
    with torch.inference_mode():
        return [workload.forward(model, to_device(x, device)).float().cpu() for x, _ in batches]


def score(workload: Workload, found: list[torch.Tensor], batches: Batches) -> float:
    """The workload's metric of the outputs `found` on `batches`."""
    return float(workload.metric_fn(torch.cat(found), torch.cat([y for _, y in batches])))


def output_error(
    found: list[torch.Tensor],
    reference: list[torch.Tensor],
    error_fn: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
) -> float:
    """The workload's `output_error_fn` of the outputs (a language model's KL to the original's next-token
    distribution), else Σ‖found − reference‖² / Σ‖reference‖² (0: the same outputs)."""
    if error_fn is not None:
        return float(error_fn(torch.cat(found), torch.cat(reference)))
    num = sum(float((f - r).pow(2).sum()) for f, r in zip(found, reference, strict=True))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return num / den if den > 0 else num


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors the model's artifact stores (its state: packed codes, masks, scales, float weights)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def materialize(workload: Workload, baseline: nn.Module, policy: Policy, device: torch.device) -> nn.Module:
    """`policy` applied to a copy of the baseline and finalized, with no fine-tuning."""
    torch.manual_seed(policy.seed)
    model = copy.deepcopy(baseline)
    ctx = make_context(workload, baseline, policy.seed, device, None)
    for step in policy.steps:
        model = techniques.apply_spec(model, step, ctx)
    return finalize(model).eval()


def measure(
    workload: Workload, baseline: nn.Module, policy: Policy, batches: Batches, reference: list[torch.Tensor]
) -> Measured:
    """One cell: `policy` materialized and measured against the baseline's `reference` outputs."""
    device = next((p.device for p in baseline.parameters()), torch.device("cpu"))
    try:
        model = materialize(workload, baseline, policy, device)
        found = outputs(workload, model, batches, device)
        metric = score(workload, found, batches)
    except Exception as exc:  # noqa: BLE001 - a cell that fails is recorded, the search goes on
        return Measured(None, None, None, (), f"{type(exc).__name__}: {exc}"[:300])
    error = output_error(found, reference, workload.output_error_fn)
    if not (math.isfinite(metric) and math.isfinite(error)):
        return Measured(None, None, None, (), f"not finite: metric {metric}, output error {error}")
    return Measured(metric, error, state_bytes(model), touched(baseline, model))


def touched(baseline: nn.Module, model: nn.Module) -> tuple[str, ...]:
    """The baseline's modules whose stored tensors the model does not hold unchanged (replaced, reshaped,
    re-valued, or with new ones under them), in model order."""
    before, after = baseline.state_dict(), model.state_dict()
    names = [name for name, _ in baseline.named_modules()]
    changed = {key for key, value in before.items() if not _same(value, after.get(key))}
    changed |= {key for key in after if key not in before}
    owners = {_owner(key, set(names)) for key in changed}
    return tuple(name for name in names if name in owners)


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


def _owner(key: str, modules: set[str]) -> str:
    """The deepest baseline module a state key lies under (`fc1.values` → `fc1`; `fc1.0.weight` → `fc1`)."""
    parts = key.split(".")[:-1]
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


Shared = tuple[Workload, dict[str, torch.Tensor], Batches]


def run_job(shared: Shared, job: Job, threads: int) -> list[Cell]:
    """One job's cells, in a Ray task or here: the baseline rebuilt from its state, on the GPU Ray gave, if any."""
    workload, state, batches = shared
    torch.set_num_threads(max(1, threads))
    device = _device()
    baseline = workload.build_model()
    baseline.load_state_dict(state)
    baseline = baseline.to(device).eval()
    reference = outputs(workload, baseline, batches, device)
    return job.cells([measure(workload, baseline, policy, batches, reference) for policy in job.policies])


def _device() -> torch.device:
    """CUDA when this process runs a Ray task that was given a GPU (and CUDA works), else the CPU."""
    import ray

    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    return torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")


def run_jobs(jobs: Sequence[Job], shared: Shared, cpus: float, gpus: float) -> list[Cell]:
    """Every job's cells: as parallel Ray tasks when Ray runs (a task that dies fails its cells), else here."""
    import ray

    threads = max(1, int(cpus))
    if not ray.is_initialized():
        return [cell for job in jobs for cell in run_job(shared, job, threads)]
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(run_job)
    ref = ray.put(shared)
    pending = {task.remote(ref, job, threads): job for job in jobs}
    cells: list[Cell] = []
    for future, job in pending.items():
        try:
            found: list[Cell] = ray.get(future)
            cells += found
        except (ray.exceptions.RayError, OSError) as exc:
            text = str(exc).strip()
            line = text.splitlines()[-1][:300] if text else type(exc).__name__
            cells += job.cells([Measured(None, None, None, (), line)] * len(job.values))
    return cells

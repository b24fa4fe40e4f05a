"""One search trial as Ray Tune runs it, on any node: params → policy → executor → report + checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.artifacts.fs import join, publish_directory, read_bytes, resolve
from orchestrator.policy import Policy
from orchestrator.search.prepare import recorded_target
from orchestrator.search.space import SearchSpace
from orchestrator.workloads import Workload

CHECKPOINT_SUBDIR = "model"
RESULT_FILE = "final_result.json"  # beside the model in a trial's only checkpoint: the trial is done
FINISHED_DIR = "finished"  # in the run directory: one record per finished configuration


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs, shipped once through Ray's object store (`tune.with_parameters`)."""

    workload: Workload
    baseline_state: dict[str, torch.Tensor]
    space: SearchSpace
    objectives: tuple[str, ...]
    cpus_per_trial: float
    run_dir: str
    latency_batch_size: int = 1
    target: str | None = None  # the deployment target; None: the one the run records in its run.json

    def deployment_target(self) -> str:
        return self.target if self.target is not None else recorded_target(self.run_dir)


_REFERENCES: dict[tuple[str, str, int, str, int], executor.Reference] = {}


def _reference_on(setup: TrialSetup, device: str, target: str) -> executor.Reference:
    """The baseline measured for `target` on this trial's device and threads (once per worker process and
    workload); the baseline is still timed again beside every trial's model."""
    key = (setup.workload.fingerprint, device, setup.latency_batch_size, target, torch.get_num_threads())
    if key not in _REFERENCES:
        baseline = _baseline(setup).to(device)
        _REFERENCES[key] = executor.measure_reference(
            setup.workload,
            baseline,
            torch.device(device),
            latency_batch_size=setup.latency_batch_size,
            target=target,
        )
    return _REFERENCES[key]


def _baseline(setup: TrialSetup) -> torch.nn.Module:
    model = setup.workload.build_model()
    model.load_state_dict(setup.baseline_state)
    return model.eval()


def _device() -> torch.device:
    """CUDA when Ray gave this trial a GPU; a GPU given but unusable is an error, never a silent CPU run."""
    import ray

    if not ray.get_gpu_ids():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"this trial was given GPU(s) {ray.get_gpu_ids()} but CUDA is not usable here (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}): check the NVIDIA driver, or search with "
            "--gpus-per-trial 0"
        )
    return torch.device("cuda")


def _check_finite(result: dict[str, Any], objectives: tuple[str, ...]) -> None:
    bad = [k for k in objectives if not isinstance(result.get(k), int | float) or not math.isfinite(result[k])]
    if bad:
        raise FloatingPointError(f"objective(s) {', '.join(bad)} not finite: {[result.get(k) for k in bad]}")


def finished_record(run_dir: str, config: dict[str, Any]) -> str:
    """Where the finished trial with this configuration keeps its result and checkpoint.

    Keyed by the configuration, not Tune's trial id: the executor is deterministic, so a configuration met
    again (a trial Tune re-runs after a restart, or one the sampler proposes twice) is never recomputed.
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return join(run_dir, f"{FINISHED_DIR}/{digest}")


def _report_finished(record: str) -> bool:
    """Report a finished record again (marked `restored`); False when there is none."""
    from ray import tune

    data = read_bytes(record, RESULT_FILE)
    if data is None:
        return False
    filesystem, path = resolve(record)
    checkpoint = tune.Checkpoint(path=path, filesystem=filesystem)
    tune.report({**json.loads(data), "restored": True}, checkpoint=checkpoint)
    return True


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: reports every objective after each fine-tuning epoch and at the end.

    Only the final report carries a checkpoint, and the finished trial is also kept under
    `finished/` in the run directory, so a trial Tune restarts after the driver died is reported again
    instead of being recomputed.
    """
    from ray import tune

    record = finished_record(setup.run_dir, config)
    if _report_finished(record):
        return
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    started = time.perf_counter()
    device = _device()
    policy = setup.space.policy(config)
    result, outcome = _compress(policy, setup, device)
    result["wall_s"] = time.perf_counter() - started
    result["checkpoint_path"] = join(record, CHECKPOINT_SUBDIR)
    _check_finite(result, setup.objectives)
    with tempfile.TemporaryDirectory(prefix="trial-") as tmp:
        store.save(outcome.model, policy, outcome.metrics, setup.workload, str(Path(tmp) / CHECKPOINT_SUBDIR))
        (Path(tmp) / RESULT_FILE).write_text(json.dumps(result))
        try:
            publish_directory(Path(tmp), record, last=RESULT_FILE)
        except FileExistsError:  # the same configuration finished meanwhile: its record stands
            pass
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))


def _compress(policy: Policy, setup: TrialSetup, device: torch.device) -> tuple[dict[str, Any], Any]:
    """Apply the policy, reporting every objective after each fine-tuning epoch but the last; return the
    final result and the executor's outcome."""
    import ray
    from ray import tune

    common = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "device": str(device),
        "policy_json": policy.dumps(),
        "techniques": ",".join(policy.techniques()),
    }
    epochs = policy.fine_tune_epochs()  # None: a step budget decides, and the count is known at the end
    ran: list[int] = []

    def on_epoch(epoch: int, value: float, artifact: dict[str, Any]) -> None:
        ran.append(epoch + 1)
        if epoch + 1 == epochs:  # the final report follows: a scheduler must not stop the finished trial here
            return
        result = {**common, **artifact, "validation": value, "epoch": epoch + 1, "final": False}
        _check_finite(result, setup.objectives)
        tune.report(result)

    target = setup.deployment_target()
    outcome = executor.apply(
        policy,
        setup.workload,
        device=device,
        baseline=_baseline(setup),
        reference=_reference_on(setup, str(device), target),  # same process, threads and device as the trial
        on_epoch=on_epoch,
        latency_batch_size=setup.latency_batch_size,
        target=target,
    )
    metrics = outcome.metrics
    result = {
        **common,
        **{k: v for k, v in metrics.items() if k not in ("kernels", "techniques")},
        "kernels_json": json.dumps(metrics["kernels"], sort_keys=True),
        "epoch": epochs if epochs is not None else len(ran),
        "final": True,
    }
    return result, outcome

"""One search trial as Ray Tune runs it, on any node: params → policy → executor → report + checkpoint."""

from __future__ import annotations

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
from orchestrator.search.space import SearchSpace
from orchestrator.workloads import Workload

CHECKPOINT_SUBDIR = "model"
RESULT_FILE = "final_result.json"  # beside the model in a trial's only checkpoint: the trial is done


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs, shipped once through Ray's object store (`tune.with_parameters`)."""

    workload: Workload
    baseline_state: dict[str, torch.Tensor]
    space: SearchSpace
    objectives: tuple[str, ...]
    cpus_per_trial: float
    latency_batch_size: int = 1


_REFERENCES: dict[tuple[str, str], executor.Reference] = {}


def _reference_on(setup: TrialSetup, device: str) -> executor.Reference:
    """The baseline measured on this trial's device (once per worker process and workload)."""
    key = (setup.workload.fingerprint, device)
    if key not in _REFERENCES:
        baseline = _baseline(setup).to(device)
        _REFERENCES[key] = executor.measure_reference(
            setup.workload, baseline, torch.device(device), latency_batch_size=setup.latency_batch_size
        )
    return _REFERENCES[key]


def _baseline(setup: TrialSetup) -> torch.nn.Module:
    model = setup.workload.build_model()
    model.load_state_dict(setup.baseline_state)
    return model.eval()


def _device() -> torch.device:
    import ray

    return torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")


def _check_finite(result: dict[str, Any], objectives: tuple[str, ...]) -> None:
    bad = [k for k in objectives if not isinstance(result.get(k), int | float) or not math.isfinite(result[k])]
    if bad:
        raise FloatingPointError(f"objective(s) {', '.join(bad)} not finite: {[result.get(k) for k in bad]}")


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: reports every objective after each fine-tuning epoch and at the end.

    Only the final report carries a checkpoint, so a trial restored from a checkpoint (after the driver
    died between its end and Tune's next snapshot) is already done.
    """
    import ray
    from ray import tune

    finished = tune.get_checkpoint()
    if finished is not None:  # resumed after its final report: report it again instead of redoing the work
        with finished.as_directory() as local:
            result = json.loads((Path(local) / RESULT_FILE).read_text())
        tune.report({**result, "restored": True}, checkpoint=finished)
        return
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    started = time.perf_counter()
    device = _device()
    policy = setup.space.policy(config)
    reference = _reference_on(setup, str(device))  # same process, threads and device as the trial
    common = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "device": str(device),
        "policy_json": policy.dumps(),
        "techniques": ",".join(policy.techniques()),
    }

    epochs = policy.fine_tune_epochs()

    def on_epoch(epoch: int, value: float, artifact: dict[str, Any]) -> None:
        if epoch + 1 == epochs:  # the final report follows: a scheduler must not stop the finished trial here
            return
        result = {**common, **artifact, "validation": value, "epoch": epoch + 1, "final": False}
        _check_finite(result, setup.objectives)
        tune.report(result)

    outcome = executor.apply(
        policy,
        setup.workload,
        device=device,
        baseline=_baseline(setup),
        reference=reference,
        on_epoch=on_epoch,
        latency_batch_size=setup.latency_batch_size,
    )
    metrics = outcome.metrics
    result = {
        **common,
        **{k: v for k, v in metrics.items() if k not in ("kernels", "techniques")},
        "kernels_json": json.dumps(metrics["kernels"], sort_keys=True),
        "epoch": epochs,
        "final": True,
        "wall_s": time.perf_counter() - started,
    }
    _check_finite(result, setup.objectives)
    with tempfile.TemporaryDirectory(prefix="trial-") as tmp:
        store.save(outcome.model, policy, metrics, setup.workload, str(Path(tmp) / CHECKPOINT_SUBDIR))
        (Path(tmp) / RESULT_FILE).write_text(json.dumps(result))
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))

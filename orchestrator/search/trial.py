"""One search trial as Ray Tune runs it, on any node: params → policy → executor → report + checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.errors import UserError
from orchestrator.files.fs import join, publish_directory, read_bytes, resolve, set_aside
from orchestrator.files.jsondoc import finite_json, parse_json
from orchestrator.measure import Reference, measure_reference
from orchestrator.policy import Policy
from orchestrator.search.pause import pause_point
from orchestrator.search.prepare import recorded_target
from orchestrator.search.space import SearchSpace
from orchestrator.workloads import Workload

CHECKPOINT_SUBDIR = "model"
RESULT_FILE = "final_result.json"  # beside the model in a trial's only checkpoint: the trial is done
FINISHED_DIR = "finished"  # in the run directory: one record per finished configuration
NOT_BELIEVED = "record_not_believed"  # in a final report: why the trial's finished record was computed again


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


_REFERENCES: dict[tuple[str, str, int, str, int], Reference] = {}


def _reference_on(setup: TrialSetup, device: str, target: str) -> Reference:
    """The baseline measured for `target` on this trial's device and threads (once per worker process and
    workload); the baseline is still timed again beside every trial's model."""
    key = (setup.workload.fingerprint, device, setup.latency_batch_size, target, torch.get_num_threads())
    if key not in _REFERENCES:
        baseline = _baseline(setup).to(device)
        _REFERENCES[key] = measure_reference(
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


def _count(value: Any, most: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= most


# The fields of a finished result its checkpoint does not determine, and what each may hold.
_FREE: dict[str, Callable[[Any], bool]] = {
    "node_id": lambda v: isinstance(v, str),
    "device": lambda v: isinstance(v, str),
    "checkpoint_path": lambda v: isinstance(v, str),
    "policy_json": lambda v: isinstance(v, str),  # compared with the checkpoint's policy as a policy
    "wall_s": lambda v: _count(v, 1e9),
    "epoch": lambda v: isinstance(v, int) and _count(v, 1e6),
}


def _expected(verified: store.Verified) -> dict[str, Any]:
    """The fields of a finished trial's result that its verified checkpoint determines (see `_compress`)."""
    metrics, policy = verified.metrics, verified.policy
    expected = {k: v for k, v in metrics.items() if k not in ("kernels", "techniques")}
    expected |= {"techniques": ",".join(policy.techniques()), "final": True}
    expected["kernels_json"] = json.dumps(metrics.get("kernels"), sort_keys=True)
    if policy.fine_tune_epochs() is not None:
        expected["epoch"] = policy.fine_tune_epochs()
    return expected


def restored_result(record: str, data: bytes, policy: Policy, workload: Workload) -> dict[str, Any]:
    """The result a finished record holds, once it agrees with the checkpoint beside it, which the checkpoint's
    manifest digests (every number its metrics record, the policy, the kernels), and that checkpoint is of
    `policy` (the trial's configuration) on `workload` (UserError saying why not)."""
    where = join(record, RESULT_FILE)
    result = parse_json(data, where)
    if not isinstance(result, dict):
        raise UserError(f"{where} is not a JSON object")
    verified = store.read_verified(join(record, CHECKPOINT_SUBDIR))
    if verified.policy != policy or verified.manifest["workload_fingerprint"] != workload.fingerprint:
        raise UserError(f"{join(record, CHECKPOINT_SUBDIR)} is not of this trial's policy and workload")
    expected = _expected(verified)
    wrong = [key for key, value in expected.items() if key not in result or result[key] != value]
    wrong += [key for key, valid in _FREE.items() if key not in expected and not valid(result.get(key))]
    wrong += [key for key in result if key not in expected and key not in _FREE]
    if wrong:
        raise UserError(f"{where} disagrees with its checkpoint on {', '.join(sorted(wrong)[:4])}")
    try:
        same = Policy.loads(result["policy_json"]) == verified.policy
    except UserError:
        same = False
    if not same:
        raise UserError(f"{where} disagrees with its checkpoint on policy_json")
    return {**result, "checkpoint_path": join(record, CHECKPOINT_SUBDIR)}  # where the checkpoint is now


def _report_finished(record: str, policy: Policy, workload: Workload) -> str | None:
    """Report a finished record of `policy` again (marked `restored`) and return None; else return "" when there
    is none, or why it is not believed when it is damaged or forged (then it is set aside, and said on stderr)."""
    from ray import tune

    data = read_bytes(record, RESULT_FILE)
    if data is None:
        return ""
    try:
        result = restored_result(record, data, policy, workload)
    except UserError as exc:
        reason = f"its finished record is not believed: {exc} (kept as {set_aside(record, RESULT_FILE)})"
        print(f"note: computing a trial again, {reason}", file=sys.stderr, flush=True)
        return reason
    filesystem, path = resolve(record)
    checkpoint = tune.Checkpoint(path=path, filesystem=filesystem)
    tune.report({**result, "restored": True}, checkpoint=checkpoint)
    return None


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: reports every objective after each fine-tuning epoch and at the end.

    Only the final report carries a checkpoint, and the finished trial is also kept under
    `finished/` in the run directory, so a trial Tune restarts after the driver died is reported again
    instead of being recomputed. A trial computed again because its record was not believed says why in its
    final report (`NOT_BELIEVED`), which the driver prints.
    """
    from ray import tune

    record = finished_record(setup.run_dir, config)
    policy = setup.space.policy(config)
    why = _report_finished(record, policy, setup.workload)
    if why is None:
        return
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    started = time.perf_counter()
    device = _device()
    result, outcome = _compress(policy, setup, device)
    result["wall_s"] = time.perf_counter() - started
    result["checkpoint_path"] = join(record, CHECKPOINT_SUBDIR)
    _check_finite(result, setup.objectives)
    with tempfile.TemporaryDirectory(prefix="trial-") as tmp:
        store.save(outcome.model, policy, outcome.metrics, setup.workload, str(Path(tmp) / CHECKPOINT_SUBDIR))
        (Path(tmp) / RESULT_FILE).write_text(json.dumps(finite_json(result), allow_nan=False))
        try:
            publish_directory(Path(tmp), record, last=RESULT_FILE)
        except FileExistsError:  # the same configuration finished meanwhile: its record stands
            pass
        pause_point("trial_recorded")  # its record is kept; Tune has not heard of it yet
        said = {NOT_BELIEVED: why} if why else {}
        tune.report({**result, **said}, checkpoint=tune.Checkpoint.from_directory(tmp))


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

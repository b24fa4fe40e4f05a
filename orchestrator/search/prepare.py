"""Before any trial runs: the run directory, the workload and its measured baseline, the search space."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.device import resolve_device
from orchestrator.errors import UserError
from orchestrator.files.fs import LOCK_FILE, absolute, cache_root, exists, is_uri, join, read_bytes, write_atomic
from orchestrator.files.jsondoc import parse_json
from orchestrator.measure import DEFAULT_TARGET, Reference, measure_reference
from orchestrator.search.config import DEFAULT_TRIALS, SearchConfig
from orchestrator.search.journal_sync import JOURNAL_FILE
from orchestrator.search.sampler import repair_journal
from orchestrator.search.space import SearchSpace, build_space
from orchestrator.workloads import Workload, resolve_workload

RUN_FILE = "run.json"  # the run directory's place, its trial budget and deployment target (see _run_record)


@dataclass(frozen=True)
class Prepared:
    """What the driver settles before any trial runs."""

    storage: str
    name: str
    run_dir: str
    workload: Workload
    baseline: nn.Module
    reference: Reference
    space: SearchSpace
    device: torch.device
    started: float
    num_trials: int = DEFAULT_TRIALS  # the budget in force: as given, or the resumed run's own
    moved_from: str | None = None  # the run directory's former place, when it was moved since it started
    extended_from: int | None = None  # the budget before `--resume --num-trials` raised it

    @property
    def journal(self) -> str:
        return journal_path(self.run_dir)


def run_directory(config: SearchConfig) -> tuple[str, str, str]:
    """(storage path, experiment name, run directory); local paths are made absolute before trials start."""
    storage = absolute(config.run.storage_path)
    label = _workload_label(config)
    name = config.run.name or f"{re.sub(r'[^A-Za-z0-9_-]+', '-', label)}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    return storage, name, join(storage, name)


def prepare(config: SearchConfig) -> Prepared:
    """Check the run directory, load the workload and its baseline, measure it, and build the space."""
    from ray import tune

    started = time.time()
    storage, name, run_dir = run_directory(config)
    if config.run.resume and not (tune.Tuner.can_restore(run_dir) or _experiment_exists(run_dir)):
        raise UserError(f"nothing to resume at {run_dir}")
    if not config.run.resume and _experiment_exists(run_dir):
        raise UserError(f"{run_dir} already holds a search; pass --resume to continue it, or a new --name")
    before = _recorded_run(run_dir, config)
    if is_uri(run_dir):
        _local_journal(run_dir, resume=config.run.resume)
    if config.run.resume:
        _settle_journal(journal_path(run_dir))
    workload = (
        resolve_workload(config.workload, data_dir=config.data_dir, weights=config.weights)
        if isinstance(config.workload, str)
        else config.workload
    )
    baseline = workload.load_baseline()
    device = resolve_device("auto")
    reference = measure_reference(
        workload,
        baseline.to(device),
        device,
        latency_batch_size=config.measure.latency_batch_size,
        target=config.measure.target,
    )
    space = build_space(
        baseline,
        config.strategy.space,
        seed=config.strategy.seed,
        defaults=workload.search_ranges,
        build_student=workload.build_student,
    )
    record = _run_record(run_dir, config, before)
    return Prepared(storage, name, run_dir, workload, baseline, reference, space, device, started, **record)


def _recorded_run(run_dir: str, config: SearchConfig) -> dict[str, Any]:
    """What a resumed run's run.json records ({} for a new run); its workload and deployment target must be
    the ones asked for, checked before any work (one front never mixes two workloads or two runtimes)."""
    before = read_run_record(run_dir) if config.run.resume else {}
    recorded = before.get("target", DEFAULT_TARGET) if before else config.measure.target
    if recorded != config.measure.target:
        raise UserError(f"this run measures for --target {recorded}; resume it with --target {recorded}")
    label = _workload_label(config)
    if before.get("workload", label) != label:
        raise UserError(
            f"this run searches workload {before['workload']!r}; resume it with --workload {before['workload']}"
        )
    return before


_RUN_FIELDS = {"run_dir": str, "num_trials": int, "target": str, "workload": str}


def read_run_record(run_dir: str) -> dict[str, Any]:
    """The run's run.json, checked field by field ({} when there is none); damage is one UserError line."""
    data = read_bytes(run_dir, RUN_FILE)
    if data is None:
        return {}
    what = f"{join(run_dir, RUN_FILE)}"
    record = parse_json(data, what)
    if not isinstance(record, dict):
        raise UserError(f"{what} is damaged: not a JSON object; restore it, or start a new run with another --name")
    for key, value in record.items():
        kind = _RUN_FIELDS.get(key)
        if kind is None or not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(
                f"{what} is damaged: unexpected {key!r}; restore it, or start a new run with another --name"
            )
    if record.get("num_trials", 1) < 1:
        raise UserError(f"{what} is damaged: num_trials {record['num_trials']}")
    return record


def _workload_label(config: SearchConfig) -> str:
    return config.workload if isinstance(config.workload, str) else config.workload.name


def _local_journal(run_dir: str, *, resume: bool) -> None:
    """A run on remote storage keeps its journal in the local cache, mirrored to the run directory: a resume
    starts from the newer copy (a fresh head has none of its own), a new run from none (an earlier run's of the
    same name is set aside)."""
    from orchestrator.search.journal_sync import pull_journal, set_aside

    local = journal_path(run_dir)
    if resume:
        pull_journal(run_dir, local)
        return
    aside = set_aside(local)
    if aside:
        print(f"note: an earlier run's journal for {run_dir} on this machine is kept as {aside}", file=sys.stderr)


def _settle_journal(journal: str) -> None:
    """Before a resume opens the journal: drop a torn last line (what a crash mid-write leaves, said once) and
    refuse any other damage in one line."""
    dropped = repair_journal(journal)
    if dropped:
        print(f"{journal}: dropped its torn last line ({dropped} bytes, a write cut off by a crash)", file=sys.stderr)


def _run_record(run_dir: str, config: SearchConfig, before: dict[str, Any]) -> dict[str, Any]:
    """The budget in force and what changed since the run began (its place, its budget); record both, with
    the deployment target."""
    budget = config.strategy.num_trials or before.get("num_trials") or DEFAULT_TRIALS
    if budget < before.get("num_trials", 0):
        raise UserError(f"--num-trials {budget} is below this run's budget of {before['num_trials']} trials")
    record = {
        "run_dir": run_dir,
        "num_trials": budget,
        "target": config.measure.target,
        "workload": _workload_label(config),
    }
    if record != before:
        write_atomic(run_dir, RUN_FILE, json.dumps(record).encode())
    moved = before.get("run_dir") not in (None, run_dir)
    extended = before.get("num_trials") not in (None, budget)
    return {
        "num_trials": budget,
        "moved_from": before["run_dir"] if moved else None,
        "extended_from": before["num_trials"] if extended else None,
    }


def recorded_target(run_dir: str) -> str:
    """The deployment target the run at `run_dir` measures for (its run.json; torch when it records none)."""
    return str(read_run_record(run_dir).get("target", DEFAULT_TARGET))


def journal_path(run_dir: str) -> str:
    """The Optuna journal beside the results (a local file; remote runs keep it in the local cache and mirror it to
    the run directory, see `journal_sync`)."""
    if not is_uri(run_dir):
        return str(Path(run_dir) / JOURNAL_FILE)
    return str(cache_root() / "journals" / (run_dir.replace("://", "_").replace("/", "_") + ".log"))


def _experiment_exists(run_dir: str) -> bool:
    """Whether `run_dir` holds a search. On remote storage: its run.json or journal (on the storage as the run
    goes, so a run whose head died before Tune saved its own state is found), or Tune's state."""
    if is_uri(run_dir):
        from ray import tune

        found = exists(run_dir, RUN_FILE) or exists(run_dir, JOURNAL_FILE)
        return found or tune.Tuner.can_restore(run_dir)
    return Path(run_dir).exists() and any(p.name != LOCK_FILE for p in Path(run_dir).iterdir())

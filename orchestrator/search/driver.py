"""The search driver: Ray Tune + Optuna over combined policies, then the front, checkpoints and tables.

`run(config)` is what `python search.py`, `ray submit cluster.yaml search.py` and `ray job submit -- python
search.py` call, in four steps: `prepare` (run directory, workload, baseline, search space), `start_ray`,
`build_tuner`, then `collect` after `Tuner.fit`. Where the trials run follows Ray's convention (`ray_session`):
`--address`, else `RAY_ADDRESS`, else a private Ray started in-process that never joins another cluster; one
console line says which.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import pickle
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from orchestrator.artifacts.store import CheckpointError
from orchestrator.artifacts.tables import RunInfo
from orchestrator.errors import StorageFull, UserError
from orchestrator.files.fs import LockHeld, cache_root, directory_lock, is_uri, upload_file
from orchestrator.search.config import SearchConfig, SearchOutcome
from orchestrator.search.pause import pause_point
from orchestrator.search.preflight import (
    check_address,
    check_search,
    check_storage_writable,
    check_trial_fits,
    run_checked_trial,
)
from orchestrator.search.prepare import JOURNAL_FILE, Prepared, prepare, run_directory
from orchestrator.search.ray_session import ADDRESS_VARIABLE, ray_target, route_ray_logs, start_ray, where_trials_run
from orchestrator.search.signals import Interrupted, stop_requests
from orchestrator.search.space import SearchSpace
from orchestrator.search.stopping import out_of_space, ran_out_of_space
from orchestrator.search.trial import TrialSetup

__all__ = ["build_tuner", "finish", "route_ray_logs", "run", "run_info", "start_ray", "trial_dirname"]

LOG_FILE = "search.log"


def run(config: SearchConfig) -> SearchOutcome:
    """Run (or resume) a search and leave trials.parquet, pareto.parquet, Pareto checkpoints and a report."""
    check_search(config)
    target = ray_target(config.resources.address)
    if target.source == ADDRESS_VARIABLE:  # --address was checked with the other flags
        check_address(target.address, flag=ADDRESS_VARIABLE)
    _quiet()
    try:
        with directory_lock(run_directory(config)[2]), stop_requests() as requests:
            prepared = prepare(config)
            target = start_ray(config.resources, log_file=_log_file(prepared))
            requests.install()  # after Ray, whose driver's own SIGTERM handler prints a C++ stack dump
            print(where_trials_run(target), file=sys.stderr, flush=True)
            check_trial_fits(config.resources.cpus_per_trial, config.resources.gpus_per_trial)
            check_storage_writable(prepared.run_dir, address_given=not target.private)
            prepared = _with_prior(config, prepared)
            from orchestrator.search.stopping import StopOnFatalTrialError

            guard = StopOnFatalTrialError()
            tuner = build_tuner(config, prepared, guard)  # the study exists, the references are enqueued
            _mirror_journal(prepared)
            pause_point("before_first_trial")
            with requests.fit():
                grid = _fit(tuner, prepared, guard)
            outcome = finish(config, prepared, grid)
            if guard.unwritable:
                raise UserError(
                    f"{guard.unwritable}; the search stopped there: once fixed, continue with --resume --name "
                    f"{prepared.name} (finished trials are kept)"
                )
            if requests.terminated:
                raise Interrupted(signal.SIGTERM, outcome)
            return outcome
    except LockHeld as exc:
        raise UserError(f"{exc}; wait for it, or choose another --name") from None


def _with_prior(config: SearchConfig, prepared: Prepared) -> Prepared:
    """The space refined by the sensitivity table (Ray runs its cells; before the study exists)."""
    from orchestrator.search.prior import sensitivity_space

    return dataclasses.replace(prepared, space=sensitivity_space(config, prepared))


def _mirror_journal(prepared: Prepared) -> None:
    """A run on remote storage: its journal goes to the run directory now, before any trial (and after each)."""
    if is_uri(prepared.run_dir):
        from orchestrator.search.journal_sync import push_journal

        push_journal(prepared.journal, prepared.run_dir)


def finish(config: SearchConfig, prepared: Prepared, grid: Any) -> SearchOutcome:
    """After `fit`: settle the journal, collect the rows, the front and the tables; a full disk is one line."""
    from orchestrator.search.collect import collect
    from orchestrator.search.sampler import fail_orphaned_trials

    complete = len(grid) >= prepared.num_trials and grid.num_terminated + grid.num_errors == len(grid)
    if complete:  # an interrupted run's RUNNING trials are resumed (or adopted) later, not failed
        fail_orphaned_trials(prepared.journal, prepared.name)
    full = any(out_of_space(result.error) for result in grid)
    try:
        if is_uri(prepared.run_dir):  # the journal was kept locally; it belongs beside the results
            upload_file(prepared.journal, prepared.run_dir, JOURNAL_FILE)
        info = dataclasses.replace(run_info(config, prepared), complete=complete and not full)
        outcome = collect(grid, config=config, prepared=prepared, run_info=info)
    except (OSError, CheckpointError) as exc:  # a Pareto checkpoint that does not fit: CheckpointError
        if not out_of_space(exc):
            raise
        full = True
    if full:
        raise _storage_full(prepared)
    return outcome


def _fit(tuner: Any, prepared: Prepared, guard: Any) -> Any:
    """`tuner.fit()`; Tune reads every failed trial's pickled error back to build its results, and a full disk
    leaves that file empty (EOFError): then the run stops with the full-disk line, resumable. The disk counts as
    full when a trial failed for lack of space (`guard`, the trials' error files) or nothing more fits now."""
    try:
        return tuner.fit()
    except (EOFError, pickle.UnpicklingError):
        full = guard.full or ran_out_of_space(prepared.run_dir)
        if not full and (is_uri(prepared.run_dir) or not _no_space_left(Path(prepared.run_dir))):
            raise
        raise _storage_full(prepared) from None


def _no_space_left(directory: Path) -> bool:
    """Whether writing 64 KiB in `directory` fails for lack of space."""
    probe = directory / ".space-probe"
    try:
        probe.write_bytes(bytes(64 * 1024))
    except OSError as exc:
        return out_of_space(exc)
    finally:
        probe.unlink(missing_ok=True)
    return False


def _storage_full(prepared: Prepared) -> StorageFull:
    return StorageFull(
        f"the disk holding {prepared.run_dir} is full; free space, then continue with "
        f"--resume --name {prepared.name} (finished trials are kept)"
    )


def _log_file(prepared: Prepared) -> Path:
    """Where Ray's and Tune's own log lines go: `search.log` in the run directory (the cache for a remote run)."""
    if is_uri(prepared.run_dir):
        return cache_root() / "logs" / f"{prepared.name}.log"
    return Path(prepared.run_dir) / LOG_FILE


def build_tuner(config: SearchConfig, prepared: Prepared, storage_guard: Any = None) -> Any:
    """A new Tuner for the search; `--resume` too builds a new one over the run's journal and finished records
    (Tune's own restore would unpickle `tuner.pkl`, and a run directory is input); `storage_guard` (a
    StopOnFatalTrialError, made here when not given) stops every trial once one failed for lack of space or on a
    node that cannot write the run directory; on remote storage the journal is uploaded after every trial."""
    from ray import tune

    from orchestrator.search.journal_sync import JournalMirror
    from orchestrator.search.progress import ProgressPrinter
    from orchestrator.search.stopping import StopOnFatalTrialError
    from orchestrator.search.tracking import tracking_callbacks

    setup = TrialSetup(
        workload=prepared.workload,
        baseline_state={k: v.detach().cpu() for k, v in prepared.baseline.state_dict().items()},
        space=prepared.space,
        objectives=config.metric_keys,
        cpus_per_trial=config.resources.cpus_per_trial,
        run_dir=prepared.run_dir,
        latency_batch_size=config.measure.latency_batch_size,
        target=config.measure.target,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_checked_trial, setup=setup),
        {"cpu": config.resources.cpus_per_trial, "gpu": config.resources.gpus_per_trial},
    )
    if config.run.resume:
        print(f"resuming {prepared.run_dir} from its journal and finished trials", file=sys.stderr)
    storage_guard = storage_guard if storage_guard is not None else StopOnFatalTrialError()
    mirror = [JournalMirror(prepared.journal, prepared.run_dir)] if is_uri(prepared.run_dir) else []
    run_config = tune.RunConfig(
        name=prepared.name,
        storage_path=prepared.storage,
        stop=storage_guard,
        failure_config=tune.FailureConfig(max_failures=config.run.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[
            ProgressPrinter(prepared.num_trials, config.metric_keys),
            storage_guard,
            *mirror,
            *tracking_callbacks(config, prepared),
        ],
        verbose=0,
    )
    concurrency = config.resources.concurrency or max(1, int((os.cpu_count() or 1) // config.resources.cpus_per_trial))
    tune_config = tune.TuneConfig(
        search_alg=_searcher(config, prepared, concurrency),
        scheduler=_scheduler(config, prepared.space, prepared.workload.metric_direction),
        num_samples=prepared.num_trials,
        reuse_actors=True,
        trial_dirname_creator=trial_dirname,
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _searcher(config: SearchConfig, prepared: Prepared, concurrency: int) -> Any:
    """Optuna (through Tune) with the constraint, the baseline run outside the sampler, and the references."""
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.search.sampler import AccuracyDropConstraint, sampler_recipe, study_exists
    from orchestrator.search.searcher import JournalSearcher

    constraint = None
    if config.strategy.max_accuracy_drop is not None:
        constraint = AccuracyDropConstraint(
            prepared.reference.metric, config.strategy.max_accuracy_drop, direction=prepared.workload.metric_direction
        )
    fixed = prepared.space.fixed_points()  # the baseline runs outside the sampler: Optuna never proposes it
    unsampled = [params for _, role, params in fixed if role == "baseline"][: prepared.num_trials]
    references = [(name, params) for name, role, params in fixed if role == "reference"]
    references = references[: prepared.num_trials - len(unsampled)]
    if study_exists(prepared.journal, prepared.name):  # resumed from its journal: the references are in it
        references = []
    searcher = JournalSearcher(
        space=prepared.space.define,
        metric=list(config.metric_keys),
        mode=["max" if d == "maximize" else "min" for d in config.directions(prepared.workload.metric_direction)],
        sampler=sampler_recipe(config.strategy.sampler, num_trials=prepared.num_trials),
        seed=config.strategy.seed,
        journal=prepared.journal,
        study_name=prepared.name,
        constraint=constraint,
        unsampled=unsampled,
        references=references,
        compresses=prepared.space.compresses,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)


def run_info(config: SearchConfig, prepared: Prepared) -> RunInfo:
    """The run's facts as known when the trials have finished (collect adds the baseline and wall time)."""
    return RunInfo(
        workload=prepared.workload.name,
        workload_fingerprint=prepared.workload.fingerprint,
        metric=prepared.workload.metric_name,
        objectives=config.metric_keys,
        directions=config.directions(prepared.workload.metric_direction),
        max_accuracy_drop=config.strategy.max_accuracy_drop,
        num_trials=prepared.num_trials,
        sampler=config.strategy.sampler,
        seed=config.strategy.seed,
        asha=config.strategy.asha,
        target=config.measure.target,
        space=prepared.space.describe(),
        device=str(prepared.device),
        threads=torch.get_num_threads(),
        run_dir=prepared.run_dir,
        started=dt.datetime.fromtimestamp(prepared.started, dt.UTC).isoformat(timespec="seconds"),
    )


def trial_dirname(trial: Any) -> str:
    """`trial_<id>`: Tune's default puts every parameter in the directory name."""
    return f"trial_{trial.trial_id}"


def _scheduler(config: SearchConfig, space: SearchSpace, metric_direction: str) -> Any:
    """ASHA on the fine-tuning epochs (optional): stops weak fine-tunes at 1, 2, 4… epochs."""
    epochs = space.max_epochs()
    if not config.strategy.asha:
        return None
    if epochs is None:
        raise UserError("--asha stops fine-tunes by epoch, but this space fine-tunes by optimiser steps (epochs 0)")
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        metric="validation",
        mode="max" if metric_direction == "maximize" else "min",
        # one past the last epoch: ASHA stops a trial that reaches max_t, which would cut off its final report
        max_t=epochs + 1,
        grace_period=1,
        reduction_factor=2,
    )


def _quiet() -> None:
    """Keep the console to our own progress lines: Tune's tables and sync warnings say nothing new here."""
    import optuna

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # each failure is one progress line; see error.txt
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

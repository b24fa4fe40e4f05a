"""The search driver: Ray Tune + Optuna over combined policies, then the front, checkpoints and tables.

`run(config)` is what `python search.py` and `ray submit cluster.yaml search.py` call. Locally it starts
Ray in-process (dashboard on 127.0.0.1); with `address="auto"` it joins a running cluster.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator import executor
from orchestrator.device import resolve_device
from orchestrator.errors import UserError
from orchestrator.space import FAMILIES, build_space, load_space_file
from orchestrator.trial import DIRECTIONS, OBJECTIVE_KEYS, TrialSetup, run_trial
from orchestrator.workloads import resolve_workload


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search run is told (the CLI's flags, one to one)."""

    workload: str = "digits"
    data_dir: str | None = None
    weights: str | None = None
    objectives: tuple[str, ...] = ("accuracy", "size")
    max_accuracy_drop: float | None = None
    num_trials: int = 32
    sampler: str = "tpe"
    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    grouping: str = "auto"
    space_file: str | None = None
    space_overrides: dict[str, Any] = field(default_factory=dict)  # merged under the file's keys
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    concurrency: int | None = None
    asha: bool = False
    storage_path: str = "runs"
    name: str | None = None
    resume: bool = False
    address: str | None = None
    max_failures: int = 1
    latency_batch_size: int = 1
    report: bool = True
    extra_ray_init: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVE_KEYS]
        if unknown or not self.objectives:
            raise UserError(f"unknown objective(s) {', '.join(unknown)}; choose from {', '.join(OBJECTIVE_KEYS)}")
        if "accuracy" not in self.objectives:
            raise UserError("the objectives must include accuracy")
        if self.num_trials < 1:
            raise UserError("--num-trials must be at least 1")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise UserError("--max-accuracy-drop is a fraction in [0, 1] (0.01 = one point)")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise UserError("--cpus-per-trial must be positive and --gpus-per-trial not negative")
        if self.concurrency is not None and self.concurrency < 1:
            raise UserError("--concurrency must be at least 1")


@dataclass
class SearchOutcome:
    run_dir: str
    trials: list[dict[str, Any]]
    pareto: list[dict[str, Any]]
    run_info: dict[str, Any]
    report: str | None = None


def _is_uri(path: str) -> bool:
    return "://" in path


def run_directory(config: SearchConfig) -> tuple[str, str, str]:
    """(storage path, experiment name, run directory); local paths are made absolute before trials start."""
    storage = config.storage_path if _is_uri(config.storage_path) else str(Path(config.storage_path).resolve())
    name = config.name or f"{config.workload.replace(':', '-').replace('.', '-')}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    return storage, name, f"{storage.rstrip('/')}/{name}"


def _quiet() -> None:
    """Keep the console to our own progress lines: Tune's tables and sync warnings say nothing new here."""
    import optuna

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _init_ray(config: SearchConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.address:
        ray.init(address=config.address, **config.extra_ray_init)
        return
    ray.init(
        dashboard_host="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="WARNING",
        **config.extra_ray_init,
    )


def run(config: SearchConfig) -> SearchOutcome:
    """Run (or resume) a search and leave trials.parquet, pareto.parquet, Pareto checkpoints and a report."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.collect import collect
    from orchestrator.progress import ProgressPrinter
    from orchestrator.sampler import AccuracyDropConstraint, ConstrainedOptunaSearch, journal_storage, make_sampler

    config.check()
    _quiet()
    started = time.time()
    storage, name, run_dir = run_directory(config)
    if config.resume and not tune.Tuner.can_restore(run_dir):
        raise UserError(f"nothing to resume at {run_dir}")
    if not config.resume and _experiment_exists(run_dir):
        raise UserError(f"{run_dir} already holds a search; pass --resume to continue it, or a new --name")
    overrides = {**config.space_overrides, **(load_space_file(config.space_file) if config.space_file else {})}
    workload = resolve_workload(config.workload, data_dir=config.data_dir, weights=config.weights)
    baseline = workload.load_baseline()
    device = resolve_device("auto")
    reference = executor.measure_reference(
        workload, baseline.to(device), device, latency_batch_size=config.latency_batch_size
    )
    space = build_space(
        baseline, families=config.families, grouping=config.grouping, overrides=overrides, seed=config.seed
    )
    objectives = tuple(OBJECTIVE_KEYS[o] for o in config.objectives)
    directions = [DIRECTIONS[o] for o in objectives]

    _init_ray(config)
    setup = TrialSetup(
        workload=workload,
        baseline_state={k: v.detach().cpu() for k, v in baseline.state_dict().items()},
        space=space,
        objectives=objectives,
        cpus_per_trial=config.cpus_per_trial,
        latency_batch_size=config.latency_batch_size,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    )
    printer = ProgressPrinter(config.num_trials, objectives)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=config.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[printer],
        verbose=0,
    )
    if config.resume:
        tuner = tune.Tuner.restore(run_dir, trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        constraint = (
            AccuracyDropConstraint(reference.metric, config.max_accuracy_drop)
            if config.max_accuracy_drop is not None
            else None
        )
        fixed = space.fixed_points()  # the baseline runs outside the sampler: Optuna never proposes it
        unsampled = [params for _, role, params in fixed if role == "baseline"][: config.num_trials]
        sampled = [params for _, role, params in fixed if role != "baseline"]
        searcher = ConstrainedOptunaSearch(
            space=space.define,
            metric=list(objectives),
            mode=["max" if d == "maximize" else "min" for d in directions],
            sampler=make_sampler(
                config.sampler, seed=config.seed, num_trials=config.num_trials, constrained=constraint is not None
            ),
            storage=journal_storage(_journal_path(run_dir)),
            study_name=name,
            points_to_evaluate=sampled[: config.num_trials - len(unsampled)] or None,
            constraint=constraint,
            unsampled=unsampled,
        )
        searcher._ot_study.set_metric_names(list(objectives))
        concurrency = config.concurrency or max(1, int((os.cpu_count() or 1) // config.cpus_per_trial))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
                scheduler=_scheduler(config, space),
                num_samples=config.num_trials,
                reuse_actors=True,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=run_config,
        )
    grid = tuner.fit()
    fail_orphaned_trials(_journal_path(run_dir), name)
    if _is_uri(run_dir):  # the journal was kept locally; it belongs beside the results
        upload_file(_journal_path(run_dir), f"{run_dir}/optuna-journal.log")
    run_info = {
        "workload": workload.name,
        "workload_fingerprint": workload.fingerprint,
        "metric": workload.metric_name,
        "objectives": list(objectives),
        "directions": directions,
        "max_accuracy_drop": config.max_accuracy_drop,
        "num_trials": config.num_trials,
        "sampler": config.sampler,
        "seed": config.seed,
        "asha": config.asha,
        "space": space.describe(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "run_dir": run_dir,
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
    }
    return collect(
        grid,
        workload=workload,
        space=space,
        reference=reference,
        baseline_test=workload.evaluate(baseline, "test", device),
        run_info=run_info,
        started=started,
        report=config.report,
    )


def trial_dirname(trial: Any) -> str:
    """`trial_<id>`: Tune's default puts every parameter in the directory name."""
    return f"trial_{trial.trial_id}"


def fail_orphaned_trials(journal: str, study_name: str) -> int:
    """Mark Optuna trials still RUNNING after the search as FAIL: they were asked for by a driver that died
    before Tune recorded them, and no trial will ever tell their result."""
    import optuna

    from orchestrator.sampler import journal_storage

    study = optuna.load_study(study_name=study_name, storage=journal_storage(journal))
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in orphans:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)


def upload_file(local: str, uri: str) -> None:
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    with filesystem.open_output_stream(path) as out:
        out.write(Path(local).read_bytes())


def _journal_path(run_dir: str) -> str:
    """The Optuna journal beside the results (a local file; remote runs keep it in the local cache)."""
    if not _is_uri(run_dir):
        return str(Path(run_dir) / "optuna-journal.log")
    from orchestrator.workloads._baseline import cache_dir

    return str(cache_dir().parent / "journals" / (run_dir.replace("://", "_").replace("/", "_") + ".log"))


def _experiment_exists(run_dir: str) -> bool:
    if _is_uri(run_dir):
        from ray import tune

        return tune.Tuner.can_restore(run_dir)
    return Path(run_dir).exists() and any(Path(run_dir).iterdir())


def _scheduler(config: SearchConfig, space: Any) -> Any:
    """ASHA on the distillation epochs (optional): stops weak fine-tunes at 1, 2, 4… epochs."""
    if not config.asha or space.distill is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        metric="validation",
        mode="max",
        # one past the last epoch: ASHA stops a trial that reaches max_t, which would cut off its final report
        max_t=max(space.distill["epochs"]) + 1,
        grace_period=1,
        reduction_factor=2,
    )

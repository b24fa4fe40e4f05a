"""What a search is told (`SearchConfig`), what it gives back (`SearchOutcome`), and the objective tables."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from orchestrator.artifacts.tables import RunInfo, TrialRow
from orchestrator.errors import UserError
from orchestrator.files.fs import join
from orchestrator.measure import DEFAULT_TARGET, check_target
from orchestrator.policy import MAX_SEED
from orchestrator.search.space_options import SpaceOptions
from orchestrator.workloads import Workload

# Objective as the user names it → the metric key every trial reports, and whether it is maximised (the metric's
# own direction is the workload's: `SearchConfig.directions`).
# latency: the model's time as a fraction of its baseline's, timed beside it in paired rounds (a trial's own
# absolute milliseconds move with the machine's load; the paired ratio does not)
OBJECTIVE_KEYS = {"accuracy": "validation", "size": "size_bytes", "latency": "relative_latency", "flops": "flops"}
DIRECTIONS = {"validation": "maximize", "size_bytes": "minimize", "relative_latency": "minimize", "flops": "minimize"}
SAMPLERS = ("tpe", "nsga2", "random")
DEFAULT_TRIALS = 32  # a new run's budget when none is given
DEFAULT_MAX_DROP = 0.05  # the accuracy guard: by default a model 5 points below the baseline is never on the front
# Profile each layer group's sensitivity first, seed budgeted policies and drop settings predicted past the guard
# (`orchestrator.search.prior`); the one default the flag, the Python API and SearchConfig read. Off: on digits at
# a handful of trials its seeds found the smallest model within a point but displaced sampled trials, and its
# profile costs a trial or two of wall time (bench.front_quality's tpe_prior arm; see the docs' benchmarks).
DEFAULT_SENSITIVITY = False
MIN_SHARE = 0.01  # the smallest share of a CPU or GPU a trial may ask for (Ray counts in ten-thousandths)
MAX_PER_TRIAL = 1024  # more CPUs or GPUs than one node has: Ray places a trial on one node


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search run is told (the CLI's flags; the search space as one typed record)."""

    workload: str | Workload = "digits"  # a built-in name, "pkg.module:function", or a Workload object
    data_dir: str | None = None
    weights: str | None = None
    objectives: tuple[str, ...] = ("accuracy", "size")
    max_accuracy_drop: float | None = DEFAULT_MAX_DROP  # None: no guard
    num_trials: int | None = None  # None: DEFAULT_TRIALS for a new run, the run's own budget for --resume
    sampler: str = "tpe"
    seed: int = 0
    space: SpaceOptions = field(default_factory=SpaceOptions)
    sensitivity: bool = DEFAULT_SENSITIVITY  # the sensitivity prior (orchestrator.search.prior)
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
    target: str = DEFAULT_TARGET  # the runtime size and latency are measured for: torch or onnxruntime
    report: bool = True
    mlflow: str | None = None  # an MLflow tracking URI; "" = mlruns/ beside the run directory
    wandb: bool = False  # log to Weights & Biases (offline unless WANDB_MODE says otherwise)
    extra_ray_init: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The trial metrics the objectives name (`accuracy` → `validation`, …)."""
        return tuple(OBJECTIVE_KEYS[o] for o in self.objectives)

    def directions(self, metric_direction: str = "maximize") -> tuple[str, ...]:
        """Each objective's direction; the metric's is the workload's (`Workload.metric_direction`)."""
        return tuple(metric_direction if k == "validation" else DIRECTIONS[k] for k in self.metric_keys)

    def check(self) -> None:
        """Raise UserError for a value no search can run with (`preflight.check_search` also checks the storage
        path, the cluster and the tracking server, before anything is created or Ray starts)."""
        unknown = [o for o in self.objectives if o not in OBJECTIVE_KEYS]
        if unknown or not self.objectives:
            raise UserError(f"unknown objective(s) {', '.join(unknown)}; choose from {', '.join(OBJECTIVE_KEYS)}")
        twice = [o for o, count in Counter(self.objectives).items() if count > 1]
        if twice:
            raise UserError(f"--objectives names {', '.join(twice)} more than once; name each objective once")
        if "accuracy" not in self.objectives:
            raise UserError("the objectives must include accuracy")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; one of {', '.join(SAMPLERS)}")
        if self.num_trials is not None and self.num_trials < 1:
            raise UserError("--num-trials must be at least 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {self.seed!r}")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise UserError(
                "--max-accuracy-drop is a fraction in [0, 1] (0.01 = one point; for a lower-is-better metric such as "
                "perplexity, 0.05 = 5% higher)"
            )
        _check_share("--cpus-per-trial", self.cpus_per_trial, "CPU cores")
        _check_share("--gpus-per-trial", self.gpus_per_trial, "GPUs", none=True)
        if self.concurrency is not None and self.concurrency < 1:
            raise UserError("--concurrency must be at least 1")
        if not isinstance(self.sensitivity, bool):
            raise UserError(f"sensitivity is on (True) or off (False), got {self.sensitivity!r}")
        if self.latency_batch_size < 1:
            raise UserError("--latency-batch-size must be at least 1")
        check_target(self.target)


def _check_share(flag: str, value: float, unit: str, *, none: bool = False) -> None:
    """A number of CPUs or GPUs per trial: finite, from MIN_SHARE to MAX_PER_TRIAL (or 0 with `none`)."""
    if none and value == 0:
        return
    if not (isinstance(value, int | float) and math.isfinite(value) and MIN_SHARE <= value <= MAX_PER_TRIAL):
        allowed = f"{'0 or ' if none else ''}from {MIN_SHARE:g} to {MAX_PER_TRIAL} {unit}"
        raise UserError(f"{flag} must be {allowed}, fractions allowed; got {value!r}")


@dataclass
class SearchOutcome:
    """What a finished search leaves: its rows, the front, the run's facts, and where they are."""

    run_dir: str
    trials: list[TrialRow]
    pareto: list[TrialRow]
    run_info: RunInfo
    report: str | None = None

    @property
    def checkpoints(self) -> list[str]:
        """The Pareto checkpoints' directories, in front order (load one with `load_checkpoint(path, workload)`)."""
        return [join(self.run_dir, row.checkpoint) for row in self.pareto if row.checkpoint]

    @property
    def finished(self) -> int:
        return sum(row.status == "completed" for row in self.trials)

    @property
    def failed(self) -> int:
        return sum(row.status == "failed" for row in self.trials)

    @property
    def interrupted(self) -> bool:
        """The run was stopped before it ended: its tables are partial and `--resume` continues it."""
        return not self.run_info.complete

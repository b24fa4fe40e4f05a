"""What a search is told (`SearchConfig`), what it gives back (`SearchOutcome`), and the objective tables.

A `SearchConfig` is the workload plus four frozen parts, one per concern, as Ray Tune splits its `TuneConfig` from
its `RunConfig`: `SearchStrategy` (what is searched and how: objectives, guard, budget, sampler, space),
`Resources` (where and on what trials run), `RunSettings` (where results go, resume, retries, tracking) and
`MeasureSettings` (the runtime sizes and latencies are measured for). Each setting's default is its field's default
in one of these dataclasses and nowhere else: `DEFAULTS` (flat name → default) is derived from them, and the command
line and `orchestrator.compress` read it.

Decisions: `SearchConfig(num_trials=8, cpus_per_trial=2)` takes the flat names too (each names exactly one part's
field, so `search.py`'s flags and a notebook's keywords read alike) and routes them into the parts; given with a
part, a flat name refines that part. Reads go through the parts (`config.strategy.num_trials`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from types import MappingProxyType
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
DEFAULT_TRIALS = 32  # the budget `num_trials=None` means for a new run (a resumed run keeps its own)
MIN_SHARE = 0.01  # the smallest share of a CPU or GPU a trial may ask for (Ray counts in ten-thousandths)
MAX_PER_TRIAL = 1024  # more CPUs or GPUs than one node has: Ray places a trial on one node


@dataclass(frozen=True)
class SearchStrategy:
    """What is searched and how: the objectives and the accuracy guard, the budget, the sampler, the space.

    `max_accuracy_drop` 0.05: by default a model 5 points below the baseline is never on the front (None: no guard).
    `sensitivity` profiles each layer group first and seeds budgeted policies (`orchestrator.search.prior`); off:
    on digits at a handful of trials its seeds found the smallest model within a point but displaced sampled
    trials, and its profile costs a trial or two of wall time (bench.front_quality's tpe_prior arm).
    """

    objectives: tuple[str, ...] = ("accuracy", "size")
    max_accuracy_drop: float | None = 0.05
    num_trials: int | None = None  # None: DEFAULT_TRIALS for a new run, the run's own budget for --resume
    sampler: str = "tpe"
    seed: int = 0
    space: SpaceOptions = field(default_factory=SpaceOptions)
    sensitivity: bool = False
    asha: bool = False  # stop weak fine-tunes early (ASHA on epochs)

    def check(self) -> None:
        """Raise UserError for a strategy no search can run with."""
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
        if not isinstance(self.sensitivity, bool):
            raise UserError(f"sensitivity is on (True) or off (False), got {self.sensitivity!r}")


@dataclass(frozen=True)
class Resources:
    """Where trials run and what each takes: the Ray cluster (`address`; None: RAY_ADDRESS, else a private Ray),
    CPUs and GPUs per trial (fractions allowed), trials at once (None: cores / cpus_per_trial)."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    concurrency: int | None = None
    address: str | None = None
    extra_ray_init: Mapping[str, Any] = field(default_factory=dict)  # more keywords for `ray.init`

    def check(self) -> None:
        """Raise UserError for resources no trial can be given."""
        _check_share("--cpus-per-trial", self.cpus_per_trial, "CPU cores")
        _check_share("--gpus-per-trial", self.gpus_per_trial, "GPUs", none=True)
        if self.concurrency is not None and self.concurrency < 1:
            raise UserError("--concurrency must be at least 1")


@dataclass(frozen=True)
class RunSettings:
    """Where the run's results go (`storage_path`/`name`; None: the workload and the time), whether it continues
    an interrupted run, retries of a lost trial, the report, and experiment tracking."""

    storage_path: str = "runs"
    name: str | None = None
    resume: bool = False
    max_failures: int = 1
    report: bool = True
    mlflow: str | None = None  # an MLflow tracking URI; "" = mlruns/ beside the run directory
    wandb: bool = False  # log to Weights & Biases (offline unless WANDB_MODE says otherwise)


@dataclass(frozen=True)
class MeasureSettings:
    """How sizes and latencies are measured: the runtime (`target`: torch or onnxruntime) and the latency batch."""

    target: str = DEFAULT_TARGET
    latency_batch_size: int = 1

    def check(self) -> None:
        """Raise UserError for a measurement that cannot be made."""
        if self.latency_batch_size < 1:
            raise UserError("--latency-batch-size must be at least 1")
        check_target(self.target)


@dataclass(frozen=True, init=False)
class SearchConfig:
    """Everything a search run is told: the workload (a built-in name, "pkg.module:function", or a Workload; its
    `data_dir` and `weights`) and the four parts. Takes the parts, or their fields by flat name (module docstring)."""

    workload: str | Workload = "digits"
    data_dir: str | None = None
    weights: str | None = None
    strategy: SearchStrategy = field(default_factory=SearchStrategy)
    resources: Resources = field(default_factory=Resources)
    run: RunSettings = field(default_factory=RunSettings)
    measure: MeasureSettings = field(default_factory=MeasureSettings)

    def __init__(
        self,
        *,
        strategy: SearchStrategy | None = None,
        resources: Resources | None = None,
        run: RunSettings | None = None,
        measure: MeasureSettings | None = None,
        **settings: Any,
    ) -> None:
        parts = dict(zip(_PARTS, (strategy, resources, run, measure), strict=True))
        unknown = sorted(set(settings) - set(SETTING_PARTS))
        if unknown:
            raise TypeError(f"SearchConfig has no setting {', '.join(unknown)}; known: {', '.join(SETTING_PARTS)}")
        for own in dataclasses.fields(SearchConfig):
            if own.name in parts:
                value: Any = _refined(parts[own.name], own, settings)
            else:
                value = settings.get(own.name, own.default)
            object.__setattr__(self, own.name, value)

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The trial metrics the objectives name (`accuracy` → `validation`, …)."""
        return tuple(OBJECTIVE_KEYS[o] for o in self.strategy.objectives)

    def directions(self, metric_direction: str = "maximize") -> tuple[str, ...]:
        """Each objective's direction; the metric's is the workload's (`Workload.metric_direction`)."""
        return tuple(metric_direction if k == "validation" else DIRECTIONS[k] for k in self.metric_keys)

    def check(self) -> None:
        """Raise UserError for a value no search can run with (`preflight.check_search` also checks the storage
        path, the cluster and the tracking server, before anything is created or Ray starts)."""
        self.strategy.check()
        self.resources.check()
        self.measure.check()


def _refined(part: Any, own: dataclasses.Field[Any], settings: Mapping[str, Any]) -> Any:
    """The part `own` names (given, else its default), with the flat `settings` that name its fields applied."""
    base = part if part is not None else _default(own)
    given = {f.name: settings[f.name] for f in dataclasses.fields(base) if f.name in settings}
    return dataclasses.replace(base, **given) if given else base


def _default(own: dataclasses.Field[Any]) -> Any:
    """A field's default: its value, or a fresh one from its factory."""
    factory: Any = own.default_factory
    return factory() if factory is not MISSING else own.default


def _flat_settings() -> tuple[dict[str, str], dict[str, Any]]:
    """Every flat setting → the part that holds it ("" for SearchConfig's own fields), and → its default."""
    where: dict[str, str] = {}
    defaults: dict[str, Any] = {}
    for own in dataclasses.fields(SearchConfig):
        is_part = own.name in _PARTS
        for setting in dataclasses.fields(_default(own)) if is_part else (own,):
            if setting.name in where:
                raise RuntimeError(f"two parts of SearchConfig name a setting {setting.name!r}")
            where[setting.name] = own.name if is_part else ""
            defaults[setting.name] = _default(setting)
    return where, defaults


_PARTS = ("strategy", "resources", "run", "measure")  # SearchConfig's parts, as its __init__ takes them
_WHERE, _DEFAULTS = _flat_settings()
SETTING_PARTS: Mapping[str, str] = MappingProxyType(_WHERE)  # flat setting → its part ("": SearchConfig's own)
DEFAULTS: Mapping[str, Any] = MappingProxyType(_DEFAULTS)  # flat setting → its default: the CLI's and the API's


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

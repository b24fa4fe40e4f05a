"""The notebook API: a model, its data and a metric in; a search outcome or a compressed model out.

Keyword-only functions over the same code path as the CLI (`workload_from` builds the Workload the CLI would
import, `compress` runs `search.run`, `apply` runs `executor.apply`):

    outcome = orchestrator.compress(model=model, train=train_loader, validation=val_loader, num_trials=16)
    best = orchestrator.load_checkpoint(outcome.checkpoints[0], outcome_workload)

`compress` is not called `search` because `orchestrator.search` is the search package. Its search settings default
to the search config's dataclasses' (`orchestrator.search.config`), as `search.py`'s flags do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.executor import CompressedModel
from orchestrator.executor import apply as apply_policy
from orchestrator.files.digest import model_fingerprint
from orchestrator.policy import Policy
from orchestrator.search import SearchConfig, SearchOutcome, SpaceOptions
from orchestrator.search import run as run_search
from orchestrator.search.config import MeasureSettings, Resources, RunSettings, SearchStrategy
from orchestrator.workloads import LoaderSplit, Split, Workload, accuracy, split_of
from techniques.tools.inputs import Inputs, OutputFn, main_output

Metric = Callable[[torch.Tensor, torch.Tensor], float]
CALIBRATION_EXAMPLES = 256  # taken from the training data when no calibration data is given


def workload_from(
    *,
    model: nn.Module,
    train: Any,
    validation: Any,
    test: Any = None,
    calibration: Any = None,
    metric: str | Metric = "accuracy",
    metric_direction: str = "maximize",
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    output_fn: OutputFn = main_output,
    distill_loss: Callable[[torch.Tensor, torch.Tensor, Inputs], torch.Tensor] | None = None,
    build_student: Callable[[float], nn.Module] | None = None,
    search_ranges: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    name: str = "model",
) -> Workload:
    """A Workload from a trained model and its data, as a notebook has them.

    Data are `(inputs, targets)` tensors (inputs a tensor, tuple or dict of tensors) or re-iterable batches
    such as a `DataLoader` yielding `(inputs, targets)` or dicts with `labels`. `test` defaults to the
    validation data (then the "test" metric is the validation metric); `calibration` to the first
    CALIBRATION_EXAMPLES training examples. `metric` is "accuracy" or an `(outputs, targets) -> float`,
    higher-is-better unless `metric_direction="minimize"` (perplexity, a loss: the guard is then relative).
    """
    splits = {"train": split_of(train), "validation": split_of(validation)}
    splits["test"] = split_of(test) if test is not None else splits["validation"]
    splits["calibration"] = split_of(calibration) if calibration is not None else _calibration(splits["train"])
    metric_fn, metric_name = (accuracy, "accuracy") if metric == "accuracy" else (metric, _name_of(metric))
    if not callable(metric_fn):
        raise TypeError(f"metric must be 'accuracy' or a function (outputs, targets) -> float, got {metric!r}")
    original = copy.deepcopy(model).cpu().eval()
    return Workload(
        name=name,
        build_model=lambda: copy.deepcopy(original),
        load_baseline=lambda: copy.deepcopy(original),
        splits=splits,
        fingerprint=model_fingerprint(original),
        metric_name=metric_name,
        metric_fn=metric_fn,
        metric_direction=metric_direction,
        loss_fn=loss,
        batch_size=batch_size,
        build_student=build_student,
        output_fn=output_fn,
        distill_loss=distill_loss,
        search_ranges=dict(search_ranges or {}),
    )


def compress(
    *,
    model: nn.Module | None = None,
    train: Any = None,
    validation: Any = None,
    workload: Workload | str | None = None,
    # each default is the one field of the search config's dataclasses that holds it, as the CLI's flags read
    num_trials: int | None = SearchStrategy.num_trials,
    objectives: tuple[str, ...] = SearchStrategy.objectives,
    max_accuracy_drop: float | None = SearchStrategy.max_accuracy_drop,
    families: tuple[str, ...] | None = SpaceOptions.families,
    storage_path: str | Path = RunSettings.storage_path,
    name: str | None = RunSettings.name,
    resume: bool = RunSettings.resume,
    address: str | None = Resources.address,
    seed: int = SearchStrategy.seed,
    target: str = MeasureSettings.target,
    sensitivity: bool = SearchStrategy.sensitivity,
    **workload_options: Any,
) -> SearchOutcome:
    """Search compression policies for a model (or a Workload) and return the front with its checkpoints.

    Give `model`, `train`, `validation` (and any `workload_from` option), or `workload`. Runs locally on a
    private Ray, or on the cluster at `address`; the run directory holds the tables, checkpoints and report.
    The defaults are `python search.py`'s: `num_trials` None is DEFAULT_TRIALS (32) for a new run and a resumed
    run's own budget with `resume`; `max_accuracy_drop` is 0.05. `target` ("torch" or "onnxruntime") is where
    sizes and latencies are measured; `sensitivity` profiles each layer group first to seed budgeted policies and
    drop settings predicted past the guard (`search.prior`).
    """
    chosen = _workload(model, train, validation, workload, workload_options)
    config = SearchConfig(
        workload=chosen,
        num_trials=num_trials,
        objectives=tuple(objectives),
        max_accuracy_drop=max_accuracy_drop,
        space=SpaceOptions(families=tuple(families)) if families else SpaceOptions(),
        storage_path=str(storage_path),
        name=name,
        resume=resume,
        address=address,
        seed=seed,
        target=target,
        sensitivity=sensitivity,
    )
    return run_search(config)


def apply(
    policy: Policy | str | Path,
    workload: Workload | str | None = None,
    *,
    model: nn.Module | None = None,
    train: Any = None,
    validation: Any = None,
    seed: int | None = None,
    device: str = "cpu",
    target: str = MeasureSettings.target,
    **workload_options: Any,
) -> CompressedModel:
    """Apply a policy (a Policy or a policy.json path) to a model and its data (or a Workload): the compressed,
    measured model."""
    chosen = _workload(model, train, validation, workload, workload_options)
    if isinstance(chosen, str):
        from orchestrator.workloads import resolve_workload

        chosen = resolve_workload(chosen)
    loaded = policy if isinstance(policy, Policy) else Policy.load(policy)
    return apply_policy(loaded, chosen, seed=seed, device=device, target=target)


def _workload(
    model: nn.Module | None, train: Any, validation: Any, workload: Workload | str | None, options: dict[str, Any]
) -> Workload | str:
    if workload is not None:
        if model is not None or train is not None or validation is not None or options:
            raise TypeError("give either workload= or model=, train=, validation= (and their options), not both")
        return workload
    if model is None or train is None or validation is None:
        raise TypeError("give model=, train= and validation= (or workload=)")
    return workload_from(model=model, train=train, validation=validation, **options)


def _calibration(train: Split | LoaderSplit) -> Split | LoaderSplit:
    if isinstance(train, Split):
        return train.subset(CALIBRATION_EXAMPLES)
    return LoaderSplit(train.loader, max_examples=CALIBRATION_EXAMPLES)


def _name_of(metric: Any) -> str:
    return getattr(metric, "__name__", "metric").strip("_<>") or "metric"

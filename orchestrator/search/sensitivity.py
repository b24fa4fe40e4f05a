"""Per-layer sensitivity: how far the workload's metric moves when one layer group alone gets one setting.

Before the trials, `profile` measures a *cell* for every layer group of every technique with a per-layer setting
in the space and every value that setting may take (its off value aside): the space's own one-step policy
(`SearchSpace.one_step_policy`: that value on that group's layers only, no fine-tuning) applied to the baseline,
finalized as a trial deploys it, and measured on the first `SUBSET_EXAMPLES` of the validation split (what the
accuracy guard reads): the workload's metric, the output error against the baseline's outputs, the bytes of its
state, and which modules it changed (`cells`). The search reads the table (`allocation`): the metric drop to stop
proposing settings predicted to break the guard on their own, the output error and bytes to seed budgeted
policies.

Decisions:
- cells run as Ray tasks (`cells.run_jobs`); a cell that fails is kept without measurements (never used, never
  cached) and said once.
- the table is cached as JSON (never a pickle) in the tool's cache under a key of the workload's fingerprint, the
  baseline's weights (`digest.model_fingerprint`), the scored examples' bytes and `PROFILE_VERSION`; cells are
  keyed by technique, layers and value, so a later search with other choices computes only the cells it lacks.
  A damaged cache file is one line and computed again; writes are atomic.
- the run keeps its own copy (`sensitivity.json`, and `sensitivity.parquet` for the report); `--resume` reads
  that copy first, so the resumed space (and its Optuna distributions) is the one the run started with.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.errors import UserError
from orchestrator.files.digest import model_fingerprint, tensor_digest
from orchestrator.files.fs import cache_root, read_bytes, write_atomic
from orchestrator.files.jsondoc import finite_json, parse_json
from orchestrator.pareto import shortfall
from orchestrator.search.cells import Batches, Cell, jobs_of, outputs, run_jobs, score, scored_batches, state_bytes
from orchestrator.search.space import SearchSpace
from orchestrator.workloads import METRIC_DIRECTIONS, Workload
from techniques.tools.inputs import tensors

PROFILE_VERSION = 2  # bump when what a cell measures changes, so older cached tables are not reused
SUBSET_EXAMPLES = 1024  # validation examples a cell is scored on (whole batches, at least this many or all)
TABLE_FILE = "sensitivity.json"
_FORMAT = "sensitivity"


@dataclass(frozen=True)
class SensitivityTable:
    """The baseline's metric and bytes on the scored examples, and every cell measured against them."""

    key: str
    metric_name: str
    baseline_metric: float
    baseline_bytes: int
    examples: int
    cells: tuple[Cell, ...]
    direction: str = "maximize"  # the metric's (a minimised one's drop is the fraction it rose)

    def drop(self, cell: Cell) -> float | None:
        """How much worse the metric got, in the accuracy guard's units (`orchestrator.pareto.shortfall`;
        negative: better); None for a failed cell."""
        return None if cell.metric is None else shortfall(self.baseline_metric, cell.metric, self.direction)

    def delta_bytes(self, cell: Cell) -> int | None:
        """How the stored bytes changed (negative: smaller)."""
        return None if cell.size_bytes is None else cell.size_bytes - self.baseline_bytes

    def to_json(self) -> dict[str, Any]:
        """The table as JSON (failed cells left out: they are computed again next time)."""
        cells = [{**asdict(c), "layers": list(c.layers), "touched": list(c.touched)} for c in self.cells]
        head = {k: v for k, v in asdict(self).items() if k != "cells"}
        kept = [cell for cell in cells if cell["metric"] is not None]
        return finite_json({"format": _FORMAT, "version": PROFILE_VERSION, **head, "cells": kept})


class DamagedTable(UserError):
    """A stored sensitivity table that is not one this tool wrote."""


_HEAD = {
    "key": str,
    "metric_name": str,
    "baseline_metric": float,
    "baseline_bytes": int,
    "examples": int,
    "direction": str,
}


def table_from_json(doc: Any, what: str) -> SensitivityTable:
    """A table as `to_json` wrote it, every field checked (DamagedTable names what is wrong)."""
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != PROFILE_VERSION:
        raise DamagedTable(f"{what} is not a sensitivity table of version {PROFILE_VERSION}")
    if set(doc) != {"format", "version", "cells", *_HEAD}:
        raise DamagedTable(f"{what} has unexpected or missing fields")
    for name, kind in _HEAD.items():
        if not _is(doc[name], kind):
            raise DamagedTable(f"{what}: {name} is not a {kind.__name__}")
    if doc["direction"] not in METRIC_DIRECTIONS:
        raise DamagedTable(f"{what}: direction is not one of {', '.join(METRIC_DIRECTIONS)}")
    if not isinstance(doc["cells"], list):
        raise DamagedTable(f"{what}: cells is not a list")
    cells = tuple(_cell(c, f"{what}: cells[{i}]") for i, c in enumerate(doc["cells"]))
    return SensitivityTable(**{k: doc[k] for k in _HEAD}, cells=cells)


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) and math.isfinite(value) if kind is float else isinstance(value, kind)


def _cell(doc: Any, what: str) -> Cell:
    if not isinstance(doc, dict) or set(doc) != set(Cell.__dataclass_fields__):
        raise DamagedTable(f"{what} is not a cell")
    value = doc["value"]
    scalar = value is None or (not isinstance(value, bool) and isinstance(value, str | int | float))
    if not all(isinstance(doc[k], str) for k in ("technique", "setting", "group")) or not scalar:
        raise DamagedTable(f"{what} has a bad technique, setting, group or value")
    numbers = _is(doc["metric"], float) and _is(doc["output_error"], float) and _is(doc["size_bytes"], int)
    if not numbers or not all(_names(doc[k]) for k in ("layers", "touched")) or doc["failure"] is not None:
        raise DamagedTable(f"{what} has a bad metric, output_error, size_bytes, layers or touched")
    return Cell(**{**doc, "layers": tuple(doc["layers"]), "touched": tuple(doc["touched"])})


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) for name in value)


# ----------------------------------------------------------------------------------------------- the table


def table_key(workload: Workload, baseline: nn.Module, batches: Batches) -> str:
    """The cache key: the workload's fingerprint, the baseline's weights, the scored examples and the version."""
    data = tensor_digest(*(t for x, y in batches for t in (*tensors(x), y)))
    parts = [workload.fingerprint, model_fingerprint(baseline), data, workload.metric_name, str(PROFILE_VERSION)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def cache_location() -> str:
    """Where sensitivity tables are cached: `sensitivity/` in the tool's cache."""
    return str(cache_root() / "sensitivity")


def read_table(location: str, name: str, *, key: str | None = None) -> SensitivityTable | None:
    """The table stored at `location/name` (None: absent, or for another key). A damaged file is one line on the
    console and None, so the cells are computed again."""
    data = read_bytes(location, name)
    if data is None:
        return None
    what = f"{location}/{name}"
    try:
        table = table_from_json(parse_json(data, what, error=DamagedTable), what)
    except DamagedTable as exc:
        say(f"note: {exc}; computing the sensitivity table again")
        return None
    return table if key is None or table.key == key else None


def write_table(table: SensitivityTable, location: str, name: str) -> str:
    """Write `table` as JSON at `location/name`, atomically."""
    return write_atomic(location, name, json.dumps(table.to_json(), indent=1, allow_nan=False).encode())


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def profile(
    space: SearchSpace,
    workload: Workload,
    baseline: nn.Module,
    *,
    cpus: float = 1.0,
    gpus: float = 0.0,
    examples: int = SUBSET_EXAMPLES,
) -> tuple[SensitivityTable, int]:
    """The table of every cell `space` offers, and how many cells were computed now (the others came from the
    cache); the cache is updated with the new ones."""
    batches = scored_batches(workload, examples)
    if not batches:
        raise UserError("sensitivity profiling needs validation examples; this workload's validation split is empty")
    key = table_key(workload, baseline, batches)
    cached = read_table(cache_location(), f"{key}.json", key=key)
    known = {cell.identity: cell for cell in (cached.cells if cached else ())}
    baseline = copy.deepcopy(baseline).cpu().eval()  # the caller's model stays where it is
    base_outputs = outputs(workload, baseline, batches, torch.device("cpu")) if cached is None else []
    base_metric = cached.baseline_metric if cached else score(workload, base_outputs, batches)
    jobs = [job for job in jobs_of(space) if any(job.identity(v) not in known for v in job.values)]
    computed: list[Cell] = []
    if jobs:
        count = sum(len(job.values) for job in jobs)
        say(f"sensitivity: measuring {count} cells (one layer group × one setting, no fine-tuning) on "
            f"{sum(len(y) for _, y in batches)} validation examples")  # fmt: skip
        state = {k: v.detach().cpu() for k, v in baseline.state_dict().items()}
        computed = run_jobs(jobs, (workload, state, batches), cpus, gpus)
        _say_failed(computed)
        known.update({cell.identity: cell for cell in computed if cell.metric is not None})
    table = SensitivityTable(
        key, workload.metric_name, base_metric, state_bytes(baseline), sum(len(y) for _, y in batches),
        tuple(known.values()), workload.metric_direction,
    )  # fmt: skip
    if jobs:
        write_table(table, cache_location(), f"{key}.json")
    return for_space(table, space, computed), len(computed)


def for_space(table: SensitivityTable, space: SearchSpace, failed: Sequence[Cell] = ()) -> SensitivityTable:
    """The table's cells this space offers, named by this space's groups (failed cells kept, without a metric)."""
    known = {cell.identity: cell for cell in table.cells}
    known.update({cell.identity: cell for cell in failed if cell.metric is None})
    cells = [
        _renamed(known[job.identity(value)], job.group)
        for job in jobs_of(space)
        for value in job.values
        if job.identity(value) in known
    ]
    return dataclasses.replace(table, cells=tuple(cells))


def _renamed(cell: Cell, group: str) -> Cell:
    return cell if cell.group == group else dataclasses.replace(cell, group=group)


def _say_failed(cells: Sequence[Cell]) -> None:
    failed = [cell for cell in cells if cell.metric is None]
    if failed:
        first = failed[0]
        say(f"note: {len(failed)} sensitivity cell(s) failed and are not used (first: {first.technique} "
            f"{first.setting}={first.value} on {first.group}: {first.failure})")  # fmt: skip

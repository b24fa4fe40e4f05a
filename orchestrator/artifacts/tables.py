"""The search's tables: `trials.parquet` and `pareto.parquet`, one row per trial, with the run's facts.

They are the source of truth for reports. A row is a `TrialRow`; the Parquet schema is derived from its
fields, so the two cannot drift. Run-level facts (a `RunInfo`: workload, objectives, deployment target,
baseline numbers, budget, wall time, versions) travel in the schema metadata under the key `orchestrator`, as JSON.
Tables are written atomically to local disk or any pyarrow filesystem (s3://, gs://, file://).
"""

from __future__ import annotations

import dataclasses
import io
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import UserError
from orchestrator.files.fs import join, read_bytes, write_atomic
from orchestrator.files.jsondoc import parse_json

TRIALS_FILE = "trials.parquet"
PARETO_FILE = "pareto.parquet"
METADATA_KEY = b"orchestrator"

# Status of a trial: completed (fully fine-tuned), stopped_early (by ASHA), failed, or interrupted (the run
# was stopped before it ended; a later --resume finishes it). Only completed trials can be on the front.
STATUSES = ("completed", "stopped_early", "failed", "interrupted")
# Role: the uncompressed baseline, a fixed reference policy, or a policy the sampler proposed.
ROLES = ("baseline", "reference", "search")


@dataclass
class TrialRow:
    """One trial as the tables record it (the last two fields only for Pareto rows)."""

    trial_id: str
    number: int
    role: str
    status: str
    feasible: bool
    pareto: bool
    validation: float | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    relative_latency: float | None = None  # 1 / speedup: the latency objective
    flops: int | None = None
    params: int | None = None
    nonzero_params: int | None = None
    compression_ratio: float | None = None
    speedup: float | None = None  # median of per-round ratios, timed beside the baseline
    speedup_low: float | None = None  # 10th and 90th percentiles of those ratios: a spread that includes
    speedup_high: float | None = None  # 1.0 is no measurable change
    search_speedup: float | None = None  # a Pareto row's speedup as its trial timed it (the row's is re-timed)
    epochs_completed: int | None = None
    wall_s: float | None = None
    device: str | None = None
    node_id: str | None = None
    techniques: str | None = None  # comma-separated technique names
    policy_json: str | None = None  # the policy document as applied
    kernels_json: str | None = None  # layer → kernel that ran it
    error: str | None = None
    test: float | None = None  # held-out metric, measured once for Pareto checkpoints
    checkpoint: str | None = None  # the Pareto checkpoint, relative to the run directory

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BaselineInfo:
    """The uncompressed baseline's numbers, as the run measured them."""

    validation: float
    size_bytes: int
    latency_ms: float
    flops: int
    params: int
    test: float | None = None
    trial_id: str | None = None


@dataclass(frozen=True)
class RunInfo:
    """What a run was asked and what it found out about its setting; stored with both tables."""

    workload: str
    workload_fingerprint: str
    metric: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    max_accuracy_drop: float | None
    num_trials: int
    sampler: str
    seed: int
    asha: bool
    space: Mapping[str, Any]
    device: str
    threads: int
    run_dir: str
    started: str
    baseline: BaselineInfo | None = None
    wall_s: float | None = None
    finished: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    complete: bool = True  # False: interrupted, the tables are partial and the run can be resumed
    target: str = "torch"  # the deployment target sizes and latencies are measured for (torch, onnxruntime)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
_PARETO_ONLY = ("test", "checkpoint")


def _arrow_field(name: str, annotation: Any) -> pa.Field:
    """A pyarrow field for a `TrialRow` annotation (`X | None` is nullable)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = isinstance(annotation, types.UnionType)
    return pa.field(name, _ARROW[args[0] if optional else annotation], nullable=optional)


_HINTS = typing.get_type_hints(TrialRow)
PARETO_SCHEMA = pa.schema([_arrow_field(f.name, _HINTS[f.name]) for f in dataclasses.fields(TrialRow)])
TRIALS_SCHEMA = pa.schema([f for f in PARETO_SCHEMA if f.name not in _PARETO_ONLY])


class ResultsError(UserError):
    """A results table is missing, unreadable or not one of ours."""


def write_table(
    rows: Sequence[TrialRow | Mapping[str, Any]],
    schema: pa.Schema,
    location: str,
    name: str,
    run_info: RunInfo | Mapping[str, Any],
) -> str:
    """Write rows as a Parquet file (atomically) with the run's facts in the metadata."""
    plain = [row.as_dict() if isinstance(row, TrialRow) else row for row in rows]
    table = pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema} for row in plain], schema=schema)
    facts = run_info.to_json() if isinstance(run_info, RunInfo) else dict(run_info)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(facts, sort_keys=True).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return write_atomic(location, name, buffer.getvalue())


def read_table(location: str, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, run facts) of one of our tables; a clear error if it is missing or damaged."""
    data = read_bytes(location, name)
    if data is None:
        raise ResultsError(f"{join(location, name)} does not exist (is this a search run directory?)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsError(
            f"{join(location, name)} is not a readable Parquet file: {str(exc).splitlines()[0]}"
        ) from None
    metadata = (table.schema.metadata or {}).get(METADATA_KEY)
    if metadata is None:
        raise ResultsError(f"{join(location, name)} was not written by this tool (no run metadata)")
    facts = parse_json(metadata, f"the run metadata of {join(location, name)}", error=ResultsError)
    if not isinstance(facts, dict):
        raise ResultsError(f"{join(location, name)} has unreadable run metadata (not a JSON object)")
    return table.to_pylist(), facts

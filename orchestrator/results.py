"""The search's tables: `trials.parquet` and `pareto.parquet`, with an explicit pyarrow schema.

They are the source of truth for reports. Run-level facts (workload, objectives, baseline numbers,
budget, wall time, versions) travel in the schema metadata under the key `orchestrator`, as JSON.
Tables are written atomically to local disk or any pyarrow filesystem (s3://, gs://, file://).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.errors import UserError

TRIALS_FILE = "trials.parquet"
PARETO_FILE = "pareto.parquet"
METADATA_KEY = b"orchestrator"

# Status of a trial: completed (fully fine-tuned), stopped_early (by ASHA: never on the front), failed.
STATUSES = ("completed", "stopped_early", "failed")
# Role: the uncompressed baseline, a fixed reference policy, or a policy the sampler proposed.
ROLES = ("baseline", "reference", "search")

TRIAL_FIELDS = [
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("number", pa.int32(), nullable=False),
    pa.field("role", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("feasible", pa.bool_(), nullable=False),
    pa.field("pareto", pa.bool_(), nullable=False),
    pa.field("validation", pa.float64()),
    pa.field("size_bytes", pa.int64()),
    pa.field("latency_ms", pa.float64()),
    pa.field("flops", pa.int64()),
    pa.field("params", pa.int64()),
    pa.field("nonzero_params", pa.int64()),
    pa.field("compression_ratio", pa.float64()),
    pa.field("speedup", pa.float64()),
    pa.field("epochs_completed", pa.int32()),
    pa.field("wall_s", pa.float64()),
    pa.field("device", pa.string()),
    pa.field("node_id", pa.string()),
    pa.field("techniques", pa.string()),  # comma-separated technique names
    pa.field("policy_json", pa.string()),  # the policy document, canonical JSON
    pa.field("kernels_json", pa.string()),  # layer → kernel that ran it
    pa.field("error", pa.string()),
]
TRIALS_SCHEMA = pa.schema(TRIAL_FIELDS)
PARETO_SCHEMA = pa.schema([*TRIAL_FIELDS, pa.field("test", pa.float64()), pa.field("checkpoint", pa.string())])


class ResultsError(UserError):
    """A results table is missing, unreadable or not one of ours."""


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def join(location: str, name: str) -> str:
    """`location/name` for a local path or a URI."""
    return f"{location.rstrip('/')}/{name}"


def write_table(
    rows: Sequence[Mapping[str, Any]], schema: pa.Schema, location: str, name: str, run_info: Mapping[str, Any]
) -> str:
    """Write rows as a Parquet file (temporary name, then move) with run facts in the metadata."""
    table = pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema} for row in rows], schema=schema)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(dict(run_info), sort_keys=True).encode()})
    filesystem, root = _filesystem(location)
    filesystem.create_dir(root, recursive=True)
    tmp = f"{root}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, filesystem=filesystem)
    filesystem.move(tmp, f"{root}/{name}")
    return join(location, name)


def read_table(location: str, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, run facts) of one of our tables; a clear error if it is missing or damaged."""
    filesystem, root = _filesystem(location)
    path = f"{root}/{name}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise ResultsError(f"{join(location, name)} does not exist (is this a search run directory?)")
    try:
        table = pq.read_table(path, filesystem=filesystem)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsError(
            f"{join(location, name)} is not a readable Parquet file: {str(exc).splitlines()[0]}"
        ) from None
    metadata = (table.schema.metadata or {}).get(METADATA_KEY)
    if metadata is None:
        raise ResultsError(f"{join(location, name)} was not written by this tool (no run metadata)")
    return table.to_pylist(), json.loads(metadata)

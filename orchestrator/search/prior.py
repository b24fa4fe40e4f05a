"""The sensitivity prior, as the driver applies it once Ray runs and before the study exists.

`sensitivity_space(config, prepared)` profiles the space (`sensitivity.profile`: cached per workload; a resumed
run reads its own `sensitivity.json`), writes the run's copies (`sensitivity.json`, `sensitivity.parquet` for the
report), removes per group the values predicted past the accuracy guard on their own, and adds the budgeted seeds
(`allocation`), each said in one console line.

Decisions: a resumed run whose study exists uses the prior exactly when it started with one (it has the run's
`sensitivity.json`), whatever the flag says now: the space, and so the Optuna distributions in its journal, must
be the ones it started with.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

import techniques
from orchestrator.files.fs import exists
from orchestrator.search.allocation import Seed, budget_seeds, removals
from orchestrator.search.config import SearchConfig
from orchestrator.search.prepare import Prepared
from orchestrator.search.sensitivity import (
    TABLE_FILE,
    SensitivityTable,
    for_space,
    profile,
    read_table,
    say,
    write_table,
)
from orchestrator.search.space import SearchSpace
from orchestrator.search.space_options import settings_of

SCHEMA = pa.schema(
    [
        ("technique", pa.string()),
        ("setting", pa.string()),
        ("title", pa.string()),
        ("group", pa.string()),
        ("layers", pa.string()),
        ("value", pa.string()),
        ("metric", pa.float64()),
        ("drop", pa.float64()),
        ("output_error", pa.float64()),
        ("size_bytes", pa.int64()),
        ("delta_bytes", pa.int64()),
        ("proposed", pa.bool_()),
        ("failure", pa.string()),
    ]
)


def wanted(config: SearchConfig, prepared: Prepared) -> bool:
    """Whether this run uses the prior: the flag, or for a resumed study whether it started with one."""
    from orchestrator.search.sampler import study_exists

    if config.run.resume and study_exists(prepared.journal, prepared.name):
        return exists(prepared.run_dir, TABLE_FILE)
    return config.strategy.sensitivity


def sensitivity_space(config: SearchConfig, prepared: Prepared) -> SearchSpace:
    """The run's space refined by the sensitivity table (see the module docstring); unchanged without the prior."""
    if not wanted(config, prepared):
        return prepared.space
    table = run_table(config, prepared)
    guard = config.strategy.max_accuracy_drop
    removed = removals(table, guard) if guard is not None else {}
    pruned = prepared.space.refined(removed, ())
    seeds = budget_seeds(table, pruned)
    _say_removed(removed)
    _say_seeds(seeds, table)
    facts = {"max_accuracy_drop": guard, "seeds": [seed.name for seed in seeds]}
    write_parquet(table, prepared.run_dir, removed, facts)
    return pruned.refined(removed, [(seed.name, seed.values) for seed in seeds])


def run_table(config: SearchConfig, prepared: Prepared) -> SensitivityTable:
    """The run's own table when it has one (a resume), else the profile (cached per workload), kept in the run."""
    own = read_table(prepared.run_dir, TABLE_FILE) if config.run.resume else None
    if own is not None:
        say(f"sensitivity: the run's own table ({len(own.cells)} cells, {prepared.run_dir}/{TABLE_FILE})")
        return for_space(own, prepared.space)
    resources = config.resources
    table, computed = profile(
        prepared.space,
        prepared.workload,
        prepared.baseline,
        cpus=resources.cpus_per_trial,
        gpus=resources.gpus_per_trial,
    )
    if computed < len(table.cells):
        say(f"sensitivity: {len(table.cells) - computed} of {len(table.cells)} cells from the cache (key {table.key})")
    write_table(table, prepared.run_dir, TABLE_FILE)
    return table


def _say_removed(removed: dict[str, tuple[Any, ...]]) -> None:
    if not removed:
        return
    listed = "; ".join(f"{name} {', '.join(map(str, values))}" for name, values in removed.items())
    count = sum(len(values) for values in removed.values())
    say(f"sensitivity: {count} setting(s) predicted past the accuracy guard on their own are not proposed: {listed}")


def _say_seeds(seeds: list[Seed], table: SensitivityTable) -> None:
    if not seeds:
        say("sensitivity: no size budget can be met from the measured cells; no budgeted policy is seeded")
        return
    told = ", ".join(
        f"{seed.ratio:g}x (predicted {table.baseline_bytes / seed.predicted_bytes:.1f}x smaller, output error "
        f"{seed.predicted_error:.2g}, drop {seed.predicted_drop:.3g})"
        for seed in seeds
    )
    say(f"sensitivity: {len(seeds)} budgeted policies run after the references: {told}")


def parquet_rows(table: SensitivityTable, removed: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    """One row per cell, as the report reads them."""
    rows = []
    for cell in table.cells:
        per_layer = settings_of(techniques.get(cell.technique)).per_layer
        rows.append(
            {
                "technique": cell.technique,
                "setting": cell.setting,
                "title": per_layer.title if per_layer is not None else cell.setting,
                "group": cell.group,
                "layers": ", ".join(cell.layers),
                "value": str(cell.value),
                "metric": cell.metric,
                "drop": table.drop(cell),
                "output_error": cell.output_error,
                "size_bytes": cell.size_bytes,
                "delta_bytes": table.delta_bytes(cell),
                "proposed": cell.value not in removed.get(f"{cell.setting}.{cell.group}", ()),
                "failure": cell.failure,
            }
        )
    return rows


def write_parquet(
    table: SensitivityTable, run_dir: str, removed: dict[str, tuple[Any, ...]], facts: dict[str, Any]
) -> str:
    """`sensitivity.parquet` in the run directory, the table's facts (and the run's `facts`) in its metadata."""
    from orchestrator.artifacts.tables import write_table as write_parquet_table
    from orchestrator.report import SENSITIVITY_FILE

    head = {
        "metric": table.metric_name,
        "baseline_metric": table.baseline_metric,
        "baseline_bytes": table.baseline_bytes,
        "examples": table.examples,
        "key": table.key,
    }
    return write_parquet_table(parquet_rows(table, removed), SCHEMA, run_dir, SENSITIVITY_FILE, {**head, **facts})

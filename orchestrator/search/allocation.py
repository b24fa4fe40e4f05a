"""From a sensitivity table to the search: values removed per layer group, and budgeted allocations to seed it.

`removals(table, max_drop)`: a value whose metric drop on its own, one group alone, is already beyond the accuracy
guard is removed for that group (the off value never is). `budget_seeds(table, space)`: for each size budget
(`BUDGETS`: 4×, 6×, 8× smaller than the float32 baseline's stored bytes), per-group values with the least predicted
damage whose predicted bytes meet it.

Decisions:
- the damage is the cells' output error (continuous; a metric on a few hundred examples moves in steps and reads
  zero for most cells), and the model is additive, as mixed-precision allocators assume it (HAWQ-V2/V3: an integer
  program over per-layer Hessian-weighted perturbations summed; ZeroQ: a Pareto frontier over per-layer output KL
  summed): an allocation's predicted error is the sum of its cells' errors, its predicted bytes the baseline's plus
  the sum of its cells' changes. The bytes are exact while no two cells touch one module (a module's stored tensors
  are its own), so an allocation never combines cells that touch the same module (two techniques on one layer; a
  structural change and the next layer it reshapes): their joint size and damage were never measured.
- greedy on the marginal rate, the usual approximation of that multiple-choice knapsack: from the uncompressed
  model, repeatedly take the change (one group to one value; cells touching the same modules back to off) that
  adds the least predicted error per byte saved (ties: the larger saving), until the predicted bytes meet the
  budget. A budget no change reaches has no allocation.
- only values the (refined) space still offers for the group, and only techniques whose choices hold their off
  value (a seed leaves the other groups of a technique it uses off).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import techniques
from orchestrator.search.sensitivity import SensitivityTable
from orchestrator.search.space import SearchSpace
from orchestrator.search.space_options import per_layer_of

BUDGETS = (4.0, 6.0, 8.0)  # times smaller than the float32 baseline's stored bytes
Unit = tuple[str, str]  # (technique, group): one search parameter


@dataclass(frozen=True)
class Option:
    """One value for one group, as the allocator sees it."""

    unit: Unit
    value: Any
    error: float  # output error
    drop: float  # metric drop, at least 0 (a rise on the scored examples is noise)
    delta: int  # change of stored bytes
    layers: frozenset[str]  # its group's layers and every module whose stored tensors it changed


def removals(table: SensitivityTable, max_drop: float) -> dict[str, tuple[Any, ...]]:
    """`SETTING.GROUP` → the values whose own drop is beyond `max_drop` (failed cells are not judged)."""
    removed: dict[str, list[Any]] = {}
    for cell in table.cells:
        drop = table.drop(cell)
        if drop is not None and drop > max_drop:
            removed.setdefault(f"{cell.setting}.{cell.group}", []).append(cell.value)
    return {name: tuple(values) for name, values in removed.items()}


def options(table: SensitivityTable, space: SearchSpace) -> list[Option]:
    """Every measured value the space still offers, for groups of techniques that can leave a group off."""
    found = []
    for cell in table.cells:
        drop, delta = table.drop(cell), table.delta_bytes(cell)
        offered = space.group_choices(cell.setting, cell.group) if cell.setting in space.choices else ()
        off = per_layer_of(techniques.get(cell.technique)).off
        if drop is None or delta is None or cell.output_error is None or cell.value not in offered:
            continue
        if off in offered:
            reach = frozenset((*cell.layers, *cell.touched))
            unit = (cell.technique, cell.group)
            found.append(Option(unit, cell.value, cell.output_error, max(drop, 0.0), delta, reach))
    return found


def allocate(found: Sequence[Option], baseline_bytes: int, budget_bytes: float) -> dict[Unit, Option] | None:
    """The greedy allocation meeting `budget_bytes` (see the module's decisions), or None when none does."""
    chosen: dict[Unit, Option] = {}
    while predicted_bytes(chosen.values(), baseline_bytes) > budget_bytes:
        move = _best_move(found, chosen)
        if move is None:
            return None
        option, displaced = move
        for unit in displaced:
            del chosen[unit]
        chosen[option.unit] = option
    return chosen


def predicted_bytes(chosen: Iterable[Option], baseline_bytes: int) -> int:
    return baseline_bytes + sum(option.delta for option in chosen)


def _best_move(found: Sequence[Option], chosen: Mapping[Unit, Option]) -> tuple[Option, list[Unit]] | None:
    """The option adding the least error per byte saved, with the units it displaces (those touching its modules)."""
    best: tuple[Option, list[Unit]] | None = None
    best_key: tuple[float, int] | None = None
    for option in found:
        displaced = [u for u, o in chosen.items() if u != option.unit and o.layers & option.layers]
        before = [chosen[u] for u in (*displaced, option.unit) if u in chosen]
        saved = sum(o.delta for o in before) - option.delta
        if saved <= 0:
            continue
        added = option.error - sum(o.error for o in before)
        key = (max(added, 0.0) / saved, -saved)
        if best_key is None or key < best_key:
            best, best_key = (option, displaced), key
    return best


@dataclass(frozen=True)
class Seed:
    """A budgeted allocation: its name, technique → group → value, and what the table predicts for it."""

    name: str
    ratio: float
    values: dict[str, dict[str, Any]]
    predicted_bytes: int
    predicted_error: float
    predicted_drop: float


def budget_seeds(table: SensitivityTable, space: SearchSpace, budgets: Sequence[float] = BUDGETS) -> list[Seed]:
    """The allocation meeting each budget that one meets (see `allocate`)."""
    found = options(table, space)
    seeds = []
    for ratio in budgets:
        chosen = allocate(found, table.baseline_bytes, table.baseline_bytes / ratio)
        if chosen is None:
            continue
        values: dict[str, dict[str, Any]] = {}
        for (technique, group), option in chosen.items():
            values.setdefault(technique, {})[group] = option.value
        picked = list(chosen.values())
        seeds.append(
            Seed(
                f"{ratio:g}x smaller (sensitivity)", ratio, values, predicted_bytes(picked, table.baseline_bytes),
                sum(o.error for o in picked), sum(o.drop for o in picked),
            )
        )  # fmt: skip
    return seeds

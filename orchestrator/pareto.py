"""Pareto fronts and hypervolume of finished trials: pure numpy, a row per trial, a column per objective.

Each column is either ``"maximize"`` or ``"minimize"``. Internally everything is flipped to minimisation.
A row dominates another when it is no worse in every objective and strictly better in at least one, so
identical rows never dominate each other: if a point is on the front, all of its copies are. Rows with a
NaN never reach the front and never dominate anything (a trial that produced no number has no place there).

How far a model falls short of its baseline on the workload's metric (`shortfall`) and the worst metric the
accuracy guard still accepts (`guard_limit`) live here too, with the same two directions. Decision: a maximised
metric (accuracy) is guarded in its own units (0.01 = one point), a minimised one (perplexity, a loss) relative
to the baseline (0.05 = 5% higher): a loss has no natural unit, and "within 5% perplexity" is how LM
compression results are stated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["feasible_pareto_front", "guard_limit", "hypervolume", "pareto_front", "pareto_mask", "shortfall"]

_SIGNS = {"minimize": 1.0, "maximize": -1.0}


def shortfall(baseline: float, value: float, direction: str = "maximize") -> float:
    """How much worse `value` is than `baseline` in the guard's units (negative: better): points below a
    maximised baseline, the fraction above a minimised one."""
    if direction == "maximize":
        return baseline - value
    if direction != "minimize":
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    return value / baseline - 1.0 if baseline > 0 else value - baseline


def guard_limit(baseline: float, max_drop: float, direction: str = "maximize") -> float:
    """The worst metric within `max_drop` of `baseline` (what `shortfall` allows)."""
    if direction == "maximize":
        return baseline - max_drop
    return baseline * (1.0 + max_drop) if baseline > 0 else baseline + max_drop


def _as_minimization(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Validate ``points`` (n, m) against ``directions`` (m) and return a float copy in minimisation form."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] == 0:
        raise ValueError(f"points must be a 2-D array (trials x objectives >= 1), got shape {pts.shape}")
    if isinstance(directions, str) or len(directions) != pts.shape[1]:
        raise ValueError(f"need one direction per objective ({pts.shape[1]}), got {directions!r}")
    unknown = [d for d in directions if d not in _SIGNS]
    if unknown:
        raise ValueError(f"directions must be 'maximize' or 'minimize', got {unknown!r}")
    return pts * np.array([_SIGNS[d] for d in directions])


def _nondominated(loss: np.ndarray, competing: np.ndarray) -> np.ndarray:
    """Mask of competing rows of ``loss`` (minimisation) that no other competing row dominates."""
    mask = competing.copy()
    candidates = loss[competing]
    for i in np.flatnonzero(competing):
        no_worse = np.all(candidates <= loss[i], axis=1)
        better = np.any(candidates < loss[i], axis=1)
        mask[i] = not np.any(no_worse & better)
    return mask


def pareto_mask(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows; duplicates of a front point are all on it, NaN rows never."""
    loss = _as_minimization(points, directions)
    return _nondominated(loss, ~np.isnan(loss).any(axis=1))


def pareto_front(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Indices of the non-dominated rows, ascending."""
    return np.flatnonzero(pareto_mask(points, directions))


def feasible_pareto_front(points: np.ndarray, directions: Sequence[str], feasible: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the front among feasible rows only.

    Infeasible rows (e.g. trials over the accuracy-drop limit) are never on the front and, unlike Optuna's
    constrained domination, do not dominate anything either: the front is exactly that of the feasible set.
    """
    loss = _as_minimization(points, directions)
    ok = np.asarray(feasible)
    if ok.dtype != bool or ok.shape != (loss.shape[0],):
        raise ValueError(f"feasible must be a boolean array of shape ({loss.shape[0]},), got {ok.dtype} {ok.shape}")
    return np.flatnonzero(_nondominated(loss, ok & ~np.isnan(loss).any(axis=1)))


def _hv_2d(loss: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume by a sweep along the first objective (points already strictly inside ``ref``)."""
    order = np.lexsort((loss[:, 1], loss[:, 0]))
    x, y = loss[order, 0], loss[order, 1]
    lowest_before = np.concatenate(([ref[1]], np.minimum.accumulate(y)[:-1]))
    return float(np.sum((ref[0] - x) * np.clip(lowest_before - y, 0.0, None)))


def _hv_slicing(loss: np.ndarray, ref: np.ndarray, *, sweep_2d: bool = True) -> float:
    """Exact hypervolume in any dimension: slice along the last objective and recurse on each slab.

    Costs about n^(m-1) 2-D sweeps, fine for a few hundred points and up to 4 objectives. ``sweep_2d=False``
    recurses down to one dimension instead, an independent route used to cross-check the sweep.
    """
    n, m = loss.shape
    if n == 0:
        return 0.0
    if m == 1:
        return float(ref[0] - loss[:, 0].min())
    if m == 2 and sweep_2d:
        return _hv_2d(loss, ref)
    order = np.argsort(loss[:, -1], kind="stable")
    loss = loss[order]
    tops = np.append(loss[1:, -1], ref[-1])
    total = 0.0
    for k in range(n):
        depth = tops[k] - loss[k, -1]
        if depth > 0.0:
            total += depth * _hv_slicing(loss[: k + 1, :-1], ref[:-1], sweep_2d=sweep_2d)
    return total


def hypervolume(points: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Volume of objective space dominated by ``points`` and bounded by the ``reference`` point.

    Only rows strictly better than the reference in every objective count; NaN rows are ignored.
    """
    loss = _as_minimization(points, directions)
    signs = np.array([_SIGNS[d] for d in directions])
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (loss.shape[1],) or not np.all(np.isfinite(ref)):
        raise ValueError(f"reference must be {loss.shape[1]} finite numbers, got {reference!r}")
    ref = ref * signs
    inside = loss[np.all(loss < ref, axis=1)]  # NaN compares False, so NaN rows drop out here
    if not np.all(np.isfinite(inside)):
        raise ValueError("points better than the reference must be finite (an infinite one has infinite volume)")
    if loss.shape[1] > 2:
        inside = inside[_nondominated(inside, np.ones(len(inside), dtype=bool))]
    return _hv_slicing(inside, ref)

"""Properties of the Pareto front and hypervolume, checked against independent brute-force oracles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import pareto
from orchestrator.pareto import feasible_pareto_front, hypervolume, pareto_front, pareto_mask

MIN, MAX = "minimize", "maximize"


# --- oracles written without the module under test -------------------------------------------------


def dominates(a: np.ndarray, b: np.ndarray, directions: list[str]) -> bool:
    """Plain-Python domination: ``a`` no worse than ``b`` everywhere and strictly better somewhere."""
    no_worse, better = True, False
    for x, y, d in zip(a, b, directions, strict=True):
        if d == MAX:
            x, y = -x, -y
        if not x <= y:  # also catches NaN
            no_worse = False
        if x < y:
            better = True
    return no_worse and better


def hv_inclusion_exclusion(points: np.ndarray, directions: list[str], reference: np.ndarray) -> float:
    """Union of boxes by inclusion-exclusion over subsets: exponential, so only for a handful of points."""
    signs = np.array([1.0 if d == MIN else -1.0 for d in directions])
    loss, ref = points * signs, reference * signs
    boxes = [p for p in loss if np.all(p < ref)]
    total = 0.0
    for k in range(1, len(boxes) + 1):
        for subset in itertools.combinations(boxes, k):
            corner = np.max(subset, axis=0)
            total += (-1) ** (k + 1) * float(np.prod(ref - corner))
    return total


def sorted_rows(a: np.ndarray) -> list[tuple[float, ...]]:
    return sorted(map(tuple, a.tolist()))


# --- strategies -------------------------------------------------------------------------------------


@st.composite
def problems(draw, *, min_points: int = 0, max_points: int = 12, min_objectives: int = 1, max_objectives: int = 4):
    """Points on a small integer grid (so ties and duplicates are common) with random directions."""
    m = draw(st.integers(min_objectives, max_objectives))
    n = draw(st.integers(min_points, max_points))
    rows = draw(st.lists(st.lists(st.integers(0, 5), min_size=m, max_size=m), min_size=n, max_size=n))
    points = np.array(rows, dtype=float).reshape(n, m)
    directions = draw(st.lists(st.sampled_from([MIN, MAX]), min_size=m, max_size=m))
    return points, directions


def reference_for(points: np.ndarray, directions: list[str], slack: float) -> np.ndarray:
    """A reference point worse than the whole 0..5 grid by ``slack`` (may be negative to cut some points)."""
    return np.array([5.0 + slack if d == MIN else 0.0 - slack for d in directions])


# --- Pareto front -----------------------------------------------------------------------------------


@settings(deadline=None)  # no per-example time limit: a busy machine is not a failure
@given(problems())
def test_front_is_exactly_the_non_dominated_set(problem):
    points, directions = problem
    front = set(pareto_front(points, directions).tolist())
    for i in range(len(points)):
        dominated = any(dominates(points[j], points[i], directions) for j in range(len(points)))
        assert (i in front) == (not dominated)
        if i not in front:  # dominated by some *front* point, not just by some point
            assert any(dominates(points[j], points[i], directions) for j in front)


@settings(deadline=None)
@given(problems(), st.randoms())
def test_front_is_permutation_invariant(problem, rnd):
    points, directions = problem
    perm = np.array(rnd.sample(range(len(points)), len(points)), dtype=int)
    front = pareto_front(points, directions)
    front_perm = pareto_front(points[perm], directions)
    assert sorted_rows(points[front]) == sorted_rows(points[perm][front_perm])
    assert np.array_equal(np.sort(perm[front_perm]), front)


@settings(deadline=None)
@given(problems())
def test_front_indices_are_sorted_and_match_mask(problem):
    points, directions = problem
    front = pareto_front(points, directions)
    assert front.dtype.kind == "i"
    assert np.all(np.diff(front) > 0)
    assert np.array_equal(np.flatnonzero(pareto_mask(points, directions)), front)


def test_hand_checked_front():
    # maximize accuracy, minimize size; (0.7, 7) is beaten by (0.8, 5); (0.9, 10) and (0.8, 5) trade off.
    points = np.array([[0.9, 10.0], [0.8, 5.0], [0.7, 7.0], [0.9, 12.0]])
    assert pareto_front(points, [MAX, MIN]).tolist() == [0, 1]
    # flipping the size direction: now bigger is better, so (0.9, 12) beats everything.
    assert pareto_front(points, [MAX, MAX]).tolist() == [3]


def test_duplicates_of_a_front_point_are_all_on_the_front():
    points = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0], [2.0, 2.0], [2.0, 2.0]])
    assert pareto_front(points, [MIN, MIN]).tolist() == [0, 1, 2]


def test_nan_rows_are_never_on_the_front_and_dominate_nothing():
    points = np.array([[np.nan, 0.0], [1.0, 1.0], [0.0, np.nan], [2.0, 2.0]])
    # Without the NaN rows, (1, 1) dominates (2, 2); the NaN rows must neither join nor change that.
    assert pareto_front(points, [MIN, MIN]).tolist() == [1]
    assert pareto_front(np.array([[np.nan, np.nan]]), [MIN, MIN]).tolist() == []


@settings(deadline=None)
@given(problems(min_objectives=2), st.data())
def test_nan_rows_are_ignored(problem, data):
    points, directions = problem
    nan_rows = np.array(data.draw(st.lists(st.booleans(), min_size=len(points), max_size=len(points))), bool)
    spoiled = points.copy()
    spoiled[nan_rows, 0] = np.nan
    expected = np.flatnonzero(~nan_rows)[pareto_front(points[~nan_rows], directions)]
    assert np.array_equal(pareto_front(spoiled, directions), expected)


# --- feasibility ------------------------------------------------------------------------------------


@settings(deadline=None)
@given(problems(), st.data())
def test_feasible_front_is_the_front_of_the_feasible_rows(problem, data):
    points, directions = problem
    feasible = np.array(data.draw(st.lists(st.booleans(), min_size=len(points), max_size=len(points))), bool)
    front = feasible_pareto_front(points, directions, feasible)
    assert np.all(feasible[front])
    expected = np.flatnonzero(feasible)[pareto_front(points[feasible], directions)]
    assert np.array_equal(front, expected)


def test_infeasible_point_does_not_dominate():
    points = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    feasible = np.array([False, True, True])
    # (0, 0) would dominate both, but it is infeasible: the two feasible points trade off.
    assert feasible_pareto_front(points, [MIN, MIN], feasible).tolist() == [1, 2]
    assert feasible_pareto_front(points, [MIN, MIN], np.zeros(3, bool)).tolist() == []


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="direction"):
        pareto_front(np.zeros((2, 2)), [MIN])
    with pytest.raises(ValueError, match="maximize"):
        pareto_front(np.zeros((2, 2)), [MIN, "max"])
    with pytest.raises(ValueError, match="2-D"):
        pareto_front(np.zeros(3), [MIN])
    with pytest.raises(ValueError, match="feasible"):
        feasible_pareto_front(np.zeros((2, 2)), [MIN, MIN], np.array([1, 0]))
    with pytest.raises(ValueError, match="reference"):
        hypervolume(np.zeros((2, 2)), [MIN, MIN], [1.0])
    with pytest.raises(ValueError, match="finite"):
        hypervolume(np.array([[-np.inf, 0.0]]), [MIN, MIN], [1.0, 1.0])


def test_empty_input():
    empty = np.zeros((0, 3))
    assert pareto_front(empty, [MIN, MAX, MIN]).tolist() == []
    assert hypervolume(empty, [MIN, MAX, MIN], [1.0, 1.0, 1.0]) == 0.0


# --- hypervolume ------------------------------------------------------------------------------------


def test_hand_checked_hypervolumes():
    # Staircase (1,3), (2,2), (3,1) under (4,4): the 3x3 square minus the uncovered 2 + 1 cells = 6.
    assert hypervolume(np.array([[1, 3], [2, 2], [3, 1]]), [MIN, MIN], [4, 4]) == pytest.approx(6.0)
    # Max accuracy / min size: boxes 0.4*10 and 0.3*15 overlapping in 0.3*10 -> 4 + 4.5 - 3 = 5.5;
    # the dominated (0.7, 7) adds nothing.
    points = np.array([[0.9, 10.0], [0.8, 5.0], [0.7, 7.0]])
    assert hypervolume(points, [MAX, MIN], [0.5, 20.0]) == pytest.approx(5.5)
    # 3-D: boxes 2*2*1 and 1*1*2 overlapping in a unit cube -> 4 + 2 - 1 = 5.
    assert hypervolume(np.array([[1, 1, 2], [2, 2, 1]]), [MIN] * 3, [3, 3, 3]) == pytest.approx(5.0)
    # A point on the reference boundary in one objective contributes nothing.
    assert hypervolume(np.array([[1.0, 4.0]]), [MIN, MIN], [4, 4]) == 0.0


@settings(deadline=None)
@given(problems(min_points=1, max_points=1), st.floats(-2.0, 3.0))
def test_single_point_is_its_box(problem, slack):
    points, directions = problem
    ref = reference_for(points, directions, slack)
    gaps = np.abs(ref - points[0])
    strictly_inside = all((p < r) if d == MIN else (p > r) for p, r, d in zip(points[0], ref, directions, strict=True))
    expected = float(np.prod(gaps)) if strictly_inside else 0.0
    assert hypervolume(points, directions, ref) == pytest.approx(expected)


@settings(deadline=None)
@given(problems(max_points=6), st.floats(-1.5, 2.0))
def test_hypervolume_matches_inclusion_exclusion(problem, slack):
    points, directions = problem
    ref = reference_for(points, directions, slack)
    expected = hv_inclusion_exclusion(points, directions, ref)
    assert hypervolume(points, directions, ref) == pytest.approx(expected, abs=1e-9)


@settings(deadline=None)
@given(problems(min_objectives=2, max_objectives=3, max_points=15), st.floats(0.0, 2.0))
def test_sweep_and_slicing_agree(problem, slack):
    points, directions = problem
    signs = np.array([1.0 if d == MIN else -1.0 for d in directions])
    loss, ref = points * signs, reference_for(points, directions, slack) * signs
    inside = loss[np.all(loss < ref, axis=1)]
    full = pareto._hv_slicing(inside, ref, sweep_2d=False)
    assert pareto._hv_slicing(inside, ref, sweep_2d=True) == pytest.approx(full, abs=1e-9)
    if len(directions) == 2:
        assert pareto._hv_2d(inside, ref) == pytest.approx(full, abs=1e-9)
    assert hypervolume(points, directions, ref * signs) == pytest.approx(full, abs=1e-9)


@settings(deadline=None)
@given(problems(), st.lists(st.integers(0, 5), min_size=4, max_size=4), st.floats(0.0, 2.0))
def test_adding_a_point_never_decreases_hypervolume(problem, extra, slack):
    points, directions = problem
    new = np.array(extra[: len(directions)], dtype=float)
    ref = reference_for(points, directions, slack)
    before = hypervolume(points, directions, ref)
    after = hypervolume(np.vstack([points, new]), directions, ref)
    assert after >= before - 1e-9


@settings(deadline=None)
@given(problems(), st.floats(0.0, 2.0))
def test_hypervolume_depends_only_on_the_front_and_flips_with_direction(problem, slack):
    points, directions = problem
    ref = reference_for(points, directions, slack)
    hv = hypervolume(points, directions, ref)
    assert hypervolume(points[pareto_front(points, directions)], directions, ref) == pytest.approx(hv)
    flipped = [MAX if d == MIN else MIN for d in directions]
    assert hypervolume(-points, flipped, -ref) == pytest.approx(hv)


def test_nan_rows_do_not_count_towards_hypervolume():
    points = np.array([[1.0, 1.0], [np.nan, 0.0], [0.0, np.nan]])
    assert hypervolume(points, [MIN, MIN], [2.0, 2.0]) == pytest.approx(1.0)

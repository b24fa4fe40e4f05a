"""Sensitivity profiling and the prior it gives the search: cells, cache, allocations, removals, report, resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch

import techniques
from orchestrator import executor
from orchestrator.files.fs import cache_root
from orchestrator.measure import measure_reference
from orchestrator.policy import Policy
from orchestrator.report import SENSITIVITY_FILE, write_report
from orchestrator.search.allocation import Option, allocate, budget_seeds, removals
from orchestrator.search.cells import Cell, materialize, state_bytes
from orchestrator.search.prior import write_parquet
from orchestrator.search.sensitivity import TABLE_FILE, SensitivityTable, cache_location, profile, table_key
from orchestrator.search.space import build_space
from orchestrator.search.space_options import options_from_json
from tests.test_report import run_dir  # noqa: F401 - the report fixture: a run with trials and a front

QUANT = {"families": ["quantization"], "choices": {"bits": [4, 8, 32]}}
QUANT_AND_SPARSITY = {
    "families": ["quantization", "unstructured_pruning"],
    "choices": {"bits": [2, 4, 8, 32], "sparsity": [0.0, 0.5, 0.95]},
}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, so every profile starts from nothing (with the session's trained baselines: a
    baseline trained again need not be bitwise the same)."""
    if (cache_root() / "baselines").is_dir():
        shutil.copytree(cache_root() / "baselines", tmp_path / "cache" / "baselines")
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def space_of(baseline, doc):  # noqa: ANN001, ANN201
    return build_space(baseline, options_from_json(doc), seed=0)


def test_cells_equal_an_independent_one_layer_evaluation(digits, digits_baseline, cache):
    space = space_of(digits_baseline, QUANT_AND_SPARSITY)
    table, computed = profile(space, digits, digits_baseline)
    assert computed == len(table.cells) == 5 * 3 + 5 * 2  # 5 layers × (3 bit-widths, 2 sparsities)
    assert table.baseline_metric == digits.evaluate(digits_baseline, "validation")  # 270 examples: all of them
    reference = measure_reference(digits, digits_baseline, "cpu")
    for technique, setting, layer, value in (
        ("quantization", "bits", "fc1", 2),
        ("unstructured_pruning", "sparsity", "conv1", 0.95),
    ):
        cell = next(c for c in table.cells if c.technique == technique and c.group == layer and c.value == value)
        step = techniques.get(technique).spec_type(**{setting: {layer: value}})
        done = executor.apply(Policy((step,)), digits, baseline=digits_baseline, reference=reference)
        assert cell.metric == done.metrics["validation"]
        assert cell.size_bytes == state_bytes(done.model)
        assert cell.layers == (layer,) and cell.touched == (layer,)
        assert cell.output_error > 0


def test_the_cache_is_reused_and_a_changed_workload_invalidates_it(digits, digits_baseline, cache):
    space = space_of(digits_baseline, QUANT)
    first, computed = profile(space, digits, digits_baseline)
    assert computed == len(first.cells) == 10
    again, computed = profile(space, digits, digits_baseline)
    assert computed == 0 and again == first
    other = dataclasses.replace(digits, fingerprint=digits.fingerprint + "-retrained")
    changed, computed = profile(space, other, digits_baseline)
    assert computed == 10 and changed.key != first.key
    # a narrower space reads its cells from the same cached table
    narrower = space_of(digits_baseline, {"families": ["quantization"], "choices": {"bits": [4, 32]}})
    part, computed = profile(narrower, digits, digits_baseline)
    assert computed == 0 and set(part.cells) < set(first.cells)


@pytest.mark.parametrize(
    "damage",
    [
        b"\x00garbage",
        b'{"format": "sensitivity", "version": 1}',
        "cell",  # one cell's metric is not a number
    ],
)
def test_a_damaged_cache_is_one_line_and_computed_again(digits, digits_baseline, cache, capsys, damage):
    space = space_of(digits_baseline, QUANT)
    table, _ = profile(space, digits, digits_baseline)
    path = Path(cache_location()) / f"{table.key}.json"
    if damage == "cell":
        doc = json.loads(path.read_text())
        doc["cells"][3]["metric"] = "high"
        damage = json.dumps(doc).encode()
    path.write_bytes(damage)
    capsys.readouterr()
    again, computed = profile(space, digits, digits_baseline)
    err = capsys.readouterr().err
    notes = [
        line
        for line in err.splitlines()
        if "damaged" in line or "not a sensitivity table" in line or "cells[3]" in line
    ]
    assert len(notes) == 1 and "computing the sensitivity table again" in notes[0], err
    assert "Traceback" not in err
    assert computed == 10 and again.cells == table.cells
    assert json.loads(path.read_text())["cells"][3]["metric"] == table.cells[3].metric  # repaired


def test_allocations_meet_their_budget_on_the_real_model(digits, digits_baseline, cache):
    space = space_of(digits_baseline, QUANT_AND_SPARSITY)
    table, _ = profile(space, digits, digits_baseline)
    seeds = budget_seeds(table, space)
    assert [seed.ratio for seed in seeds] == [4.0, 6.0, 8.0]
    points = {name: params for name, _, params in space.refined({}, [(s.name, s.values) for s in seeds]).fixed_points()}
    for seed in seeds:
        assert seed.predicted_bytes <= table.baseline_bytes / seed.ratio
        policy = space.policy(points[seed.name])
        steps = tuple(s for s in policy.steps if not techniques.get(s.technique).fine_tunes)
        model = materialize(digits, digits_baseline, Policy(steps), torch.device("cpu"))
        assert state_bytes(model) == seed.predicted_bytes  # bytes are additive: no layer has two techniques
        layers = [layer for groups in seed.values.values() for layer in groups]
        assert len(layers) == len(set(layers))


def option(unit, value, error, delta, *layers):  # noqa: ANN001, ANN201
    return Option(unit, value, error, 0.0, delta, frozenset(layers))


def test_the_allocator_never_combines_cells_on_one_module_and_says_when_no_budget_fits():
    found = [
        option(("quantization", "a"), 8, 0.0, -300, "a"),
        option(("quantization", "a"), 4, 0.2, -350, "a"),
        option(("structured_pruning", "a"), 0.5, 0.1, -500, "a", "b"),  # reshapes b too
        option(("quantization", "b"), 4, 0.01, -200, "b"),
    ]
    for budget in (1000, 700, 500, 450):
        chosen = allocate(found, 1000, budget)
        assert chosen is not None and 1000 + sum(o.delta for o in chosen.values()) <= budget
        picked = list(chosen.values())
        assert all(not (x.layers & y.layers) for i, x in enumerate(picked) for y in picked[i + 1 :])
    assert allocate(found, 1000, 400) is None  # the most any allocation saves is 550 bytes
    # 700: a at 8 bits costs nothing per byte saved, so it goes first
    assert {u: o.value for u, o in allocate(found, 1000, 700).items()} == {("quantization", "a"): 8}


def test_settings_predicted_past_the_guard_are_not_proposed(digits, digits_baseline, cache):
    space = space_of(digits_baseline, QUANT_AND_SPARSITY)
    table, _ = profile(space, digits, digits_baseline)
    removed = removals(table, 0.05)
    for cell in table.cells:
        past = table.drop(cell) > 0.05
        assert (cell.value in removed.get(f"{cell.setting}.{cell.group}", ())) == past
    assert removed and all(0.0 not in values for values in removed.values())  # never the off value
    refined = space.refined(removed, [(s.name, s.values) for s in budget_seeds(table, space.refined(removed, ()))])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):
        trial = study.ask()
        refined.define(trial)
        assert not [k for k, v in trial.params.items() if v in removed.get(k, ())]
        study.tell(trial, 0.0)
    for _, _, params in refined.fixed_points():
        assert not [k for k, v in params.items() if v in removed.get(k, ())]


def cell(technique: str, setting: str, layer: str, value: object, metric: float, size: int) -> Cell:
    where = {"technique": technique, "setting": setting, "group": layer, "layers": (layer,), "value": value}
    return Cell(metric, 1 - metric, size, (layer,), **where)


def table_for_report() -> SensitivityTable:
    cells = [
        cell("quantization", "bits", "fc1", 4, 0.97, 1000),
        cell("quantization", "bits", "fc1", 2, 0.70, 800),
        cell("unstructured_pruning", "sparsity", "conv1", 0.95, 0.40, 1500),
    ]
    return SensitivityTable("k", "accuracy", 0.98, 2000, 270, tuple(cells))


def test_the_heat_map_is_in_the_report(run_dir):  # noqa: F811
    table = table_for_report()
    write_parquet(
        table, str(run_dir), {"bits.fc1": (2,)}, {"max_accuracy_drop": 0.05, "seeds": ["4x smaller (sensitivity)"]}
    )
    html = Path(write_report(str(run_dir)).html).read_text()
    assert 'id="sensitivity"' in html and "Sensitivity</h2>" in html
    assert "4x smaller (sensitivity)" in html
    assert "\\u2715 0.28" in html or "✕ 0.28" in html  # fc1 at 2 bits: 0.98 − 0.70, not proposed
    assert all(column in html for column in ("bits 4", "bits 2", "sparsity 0.95"))
    (run_dir / SENSITIVITY_FILE).write_bytes(b"not parquet")
    html = Path(write_report(str(run_dir)).html).read_text()
    assert 'id="sensitivity"' not in html and "the sensitivity heat map is left out" in html


def test_without_a_table_the_report_has_no_sensitivity_section(run_dir):  # noqa: F811
    assert "Sensitivity</h2>" not in Path(write_report(str(run_dir)).html).read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_profiles_with_ray_tasks_and_resume_reuses_the_runs_table(
    tmp_path, digits, digits_baseline, cache, capsys
):
    from orchestrator.search import SearchConfig, run

    doc = {**QUANT, "distillation": {"epochs": [1]}}
    config = SearchConfig(
        space=options_from_json(doc), num_trials=3, storage_path=str(tmp_path), name="prior", sensitivity=True
    )
    outcome = run(config)
    err = capsys.readouterr().err
    assert "sensitivity: measuring 10 cells" in err
    kept = tmp_path / "prior"
    assert (kept / TABLE_FILE).is_file() and (kept / SENSITIVITY_FILE).is_file()
    assert 'id="sensitivity"' in Path(outcome.report).read_text()
    here, _ = profile(space_of(digits_baseline, QUANT), digits, digits_baseline)  # in this process, cache just made
    ray_made = json.loads((kept / TABLE_FILE).read_text())
    assert ray_made["key"] == table_key(digits, digits_baseline, [(x, y) for x, y in digits.batches("validation")])
    assert [(c["value"], c["metric"], c["size_bytes"]) for c in ray_made["cells"]] == [
        (c.value, c.metric, c.size_bytes) for c in here.cells
    ]
    shutil.rmtree(cache_location())  # the resume must not need the cached table
    resumed = run(dataclasses.replace(config, num_trials=4, resume=True))
    err = capsys.readouterr().err
    assert "the run's own table" in err and "measuring" not in err
    assert len(resumed.trials) == 4 and resumed.failed == 0

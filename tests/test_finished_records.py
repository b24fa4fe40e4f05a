"""A finished trial's record (`finished/<digest>/final_result.json` beside its checkpoint) is input to `--resume`:
it is believed only when it agrees with the checkpoint its manifest digests; a forged or damaged one is set aside
(said once on stderr) and the trial computed again, never reported, never turned into a failed trial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from orchestrator.search import trial
from orchestrator.search.space import build_space
from orchestrator.search.space_options import options_from_json
from tests.test_checkpoint_hostile import make_tiny


def outside_ray(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Let trials run outside Ray (no GPU, one node); return the list every `tune.report` is kept in."""
    import ray
    from ray import tune

    found: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
    monkeypatch.setattr(tune, "report", lambda result, checkpoint=None: found.append(result))
    return found


def trial_setup(run_dir: str) -> trial.TrialSetup:
    """Trials of the tiny untrained DigitsCNN workload, searching quantization, kept in `run_dir`."""
    workload = make_tiny()
    space = build_space(workload.build_model(), options_from_json({"families": ["quantization"]}))
    torch.manual_seed(0)
    return trial.TrialSetup(
        workload=workload,
        baseline_state=workload.build_model().state_dict(),
        space=space,
        objectives=("validation", "size_bytes"),
        cpus_per_trial=1,
        run_dir=run_dir,
        target="torch",
    )


@pytest.fixture
def reports(monkeypatch) -> list[dict[str, Any]]:
    return outside_ray(monkeypatch)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> trial.TrialSetup:
    return trial_setup(str(tmp_path_factory.mktemp("run")))


def int8_config(setup: trial.TrialSetup) -> dict[str, Any]:
    return next(params for name, _, params in setup.space.fixed_points() if name == "uniform int8")


def finished(setup: trial.TrialSetup, reports: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """The record of the int8 trial (computed once per module) and its computed result."""
    record = Path(trial.finished_record(setup.run_dir, int8_config(setup)))
    if not (record / trial.RESULT_FILE).exists():
        trial.run_trial(int8_config(setup), setup)
        assert not reports.pop().get("restored")
    return record, json.loads((record / trial.RESULT_FILE).read_text())


def _forge(record: Path, data: bytes) -> Path:
    """Replace the record's result; return a copy of the true record to put back afterwards."""
    original = record.with_name(record.name + ".true")
    if not original.exists():
        shutil.copytree(record, original)
    (record / trial.RESULT_FILE).write_bytes(data)
    return original


def test_an_untouched_record_is_reported_again_not_recomputed(setup, reports):
    record, computed = finished(setup, reports)
    trial.run_trial(int8_config(setup), setup)
    (restored,) = reports
    assert restored["restored"] is True
    assert {k: v for k, v in restored.items() if k != "restored"} == computed


def _edited(computed: dict[str, Any], **changes: Any) -> bytes:
    return json.dumps({**computed, **changes}).encode()


def _raw(computed: dict[str, Any], key: str, text: bytes) -> bytes:
    """The result with the JSON text of `key`'s value replaced by `text` (what json.dumps would not write)."""
    return _edited(computed, **{key: "@raw@"}).replace(b'"@raw@"', text)


FORGERIES = {
    "better numbers": lambda c: _edited(c, validation=0.9999, size_bytes=1000),
    "a smaller size only": lambda c: _edited(c, size_bytes=c["size_bytes"] - 1),
    "another policy": lambda c: _edited(c, policy_json=json.dumps({"_type": "policy", "_version": 1, "steps": []})),
    "a malformed policy": lambda c: _edited(c, policy_json="{"),
    "an unknown field": lambda c: _edited(c, pareto=True),
    "a missing field": lambda c: json.dumps({k: v for k, v in c.items() if k != "latency_ms"}).encode(),
    "not json": lambda c: b"{oops",
    "a 5000-digit number": lambda c: _raw(c, "size_bytes", b"9" * 5000),
    "a 400-digit number": lambda c: _raw(c, "wall_s", b"9" * 400),
    "nan": lambda c: _raw(c, "validation", b"NaN"),
    "a list": lambda c: b"[1, 2]",
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_a_forged_or_damaged_record_is_computed_again_and_said_once(case, setup, reports, capsys):
    record, computed = finished(setup, reports)
    original = _forge(record, FORGERIES[case](computed))
    try:
        trial.run_trial(int8_config(setup), setup)
        (result,) = reports
        assert not result.get("restored") and result["final"] is True
        for key in ("validation", "size_bytes", "policy_json"):
            assert result[key] == computed[key]
        notes = [line for line in capsys.readouterr().err.splitlines() if "not believed" in line]
        assert len(notes) == 1 and trial.RESULT_FILE in notes[0]
        assert trial.RESULT_FILE in result[trial.NOT_BELIEVED]  # for the driver to say on the console
        assert json.loads((record / trial.RESULT_FILE).read_text())["validation"] == computed["validation"]
        assert len(list(record.parent.glob(f".{record.name}.set-aside-*"))) >= 1  # kept for whoever looks
        trial.run_trial(int8_config(setup), setup)  # the record written again is believed
        assert reports[-1]["restored"] is True
    finally:
        shutil.rmtree(record, ignore_errors=True)
        shutil.copytree(original, record)


def test_a_true_record_of_another_configuration_copied_in_is_not_believed(setup, reports, capsys):
    """Self-consistent, digests and all, but of another policy: the record names the configuration it is of."""
    record, computed = finished(setup, reports)
    other = next(params for name, _, params in setup.space.fixed_points() if name == "uniform 4-bit")
    trial.run_trial(other, setup)
    copied = Path(trial.finished_record(setup.run_dir, other))
    original = _forge(record, (record / trial.RESULT_FILE).read_bytes())
    shutil.rmtree(record)
    shutil.copytree(copied, record)
    try:
        trial.run_trial(int8_config(setup), setup)
        assert reports[-1]["policy_json"] == computed["policy_json"] and not reports[-1].get("restored")
        assert "is not of this trial's policy and workload" in capsys.readouterr().err
    finally:
        shutil.rmtree(record, ignore_errors=True)
        shutil.copytree(original, record)


def test_a_record_whose_checkpoint_metrics_were_edited_too_is_not_believed(setup, reports, capsys):
    """The checkpoint's manifest digests its metrics: editing both files is caught there."""
    record, computed = finished(setup, reports)
    original = _forge(record, _edited(computed, validation=0.9999))
    metrics = record / trial.CHECKPOINT_SUBDIR / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "validation": 0.9999}))
    try:
        trial.run_trial(int8_config(setup), setup)
        assert reports[-1]["validation"] == computed["validation"] and not reports[-1].get("restored")
        assert "metrics.json is corrupted" in capsys.readouterr().err
    finally:
        shutil.rmtree(record, ignore_errors=True)
        shutil.copytree(original, record)


def test_the_driver_says_which_trials_were_computed_again(capsys):
    from orchestrator.search.collect import _say_not_believed

    why = "its finished record is not believed: x"
    computed_again = SimpleNamespace(metrics={trial.NOT_BELIEVED: why}, path="/r/t1")
    kept = SimpleNamespace(metrics={"restored": True}, path="/r/t2")
    _say_not_believed([computed_again, kept, SimpleNamespace(metrics=None, path="/r/t3")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: trial t1 was computed again: {why}"]


@pytest.mark.slow
@pytest.mark.ray
def test_forged_records_then_resume_keep_their_numbers_out_of_the_tables(tmp_path):
    """The issue's own steps: a search, every finished record edited to a better trial, then `--resume`."""
    import subprocess

    from orchestrator.artifacts.tables import PARETO_FILE, TRIALS_FILE, read_table
    from tests.test_search_faults import search_args

    storage = tmp_path / "runs"
    done = subprocess.run(search_args(storage, "forged", "--num-trials", "3"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = storage / "forged"
    before, _ = read_table(str(run_dir), TRIALS_FILE)
    forged = list((run_dir / trial.FINISHED_DIR).glob(f"*/{trial.RESULT_FILE}"))
    assert forged
    for path in forged:
        path.write_text(json.dumps({**json.loads(path.read_text()), "validation": 0.9999, "size_bytes": 1000}))
    again = subprocess.run(
        search_args(storage, "forged", "--num-trials", "3", "--resume"), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("was computed again") == len(forged), again.stderr[-3000:]
    for table in (TRIALS_FILE, PARETO_FILE):
        rows, _ = read_table(str(run_dir), table)
        assert rows and not any(r["validation"] == 0.9999 or r["size_bytes"] == 1000 for r in rows)
    after, _ = read_table(str(run_dir), TRIALS_FILE)
    numbers = sorted((r["policy_json"], r["validation"], r["size_bytes"]) for r in after)
    assert numbers == sorted((r["policy_json"], r["validation"], r["size_bytes"]) for r in before)

"""A run directory is input: a damaged run.json or Optuna journal, or a resume of another workload, is one line
and exit 2 before any trial runs; a journal whose last line a crash tore in half resumes without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import search_main
from orchestrator.errors import UserError
from orchestrator.search.prepare import JOURNAL_FILE, RUN_FILE, read_run_record
from orchestrator.search.sampler import journal_storage, repair_journal


def journal_with_a_study(path: Path) -> bytes:
    import optuna

    study = optuna.create_study(study_name="run", storage=journal_storage(path), directions=["maximize"] * 2)
    study.enqueue_trial({"x": 1})
    study.tell(study.ask(), [0.5, 0.25])
    return path.read_bytes()


def resume(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[str]]:
    code = search_main(["--storage-path", str(tmp_path), "--name", "run", "--resume", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "content",
    [
        "{oops",
        "[1, 2]",
        '{"num_trials": ' + "9" * 5000 + "}",
        '{"num_trials": NaN}',
        '{"num_trials": -3}',
        '{"target": ["torch"]}',
        '{"run_dir": "x", "evil": 1}',
        "[" * 100_000,
    ],
)
def test_a_damaged_run_json_is_one_line_before_any_work(tmp_path, capsys, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_FILE).write_text(content)
    code, err = resume(tmp_path, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {run_dir / RUN_FILE}"), err
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == [RUN_FILE]  # nothing else written
    with pytest.raises(UserError):
        read_run_record(str(run_dir))


def test_resuming_a_run_of_another_workload_is_refused_before_any_trial(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"run_dir": str(run_dir), "num_trials": 4, "target": "torch", "workload": "text"}
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    code, err = resume(tmp_path, capsys, "--workload", "digits")
    assert code == 2 and err == ["error: this run searches workload 'text'; resume it with --workload text"]
    assert not (run_dir / "finished").exists()


def test_a_torn_last_journal_line_is_dropped_and_said_once(tmp_path):
    journal = tmp_path / JOURNAL_FILE
    whole = journal_with_a_study(journal)
    for torn in (b'{"op_code":4,"worker_id":"ab', b"{", b'{"op_co'):
        journal.write_bytes(whole + torn)
        assert repair_journal(journal) == len(torn)
        assert journal.read_bytes() == whole
    assert repair_journal(journal) == 0 and journal.read_bytes() == whole
    assert repair_journal(tmp_path / "absent.log") == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda whole: whole + b"garbage appended\n",
        lambda whole: whole + b"trailing garbage without a newline",
        lambda whole: whole[:40] + b"\n" + whole,  # a line torn in the middle of the file
        lambda whole: whole + b'{"op_code": ' + b"9" * 5000 + b"}\n",
        lambda whole: whole + b"[" * 100_000 + b"\n",
        lambda whole: whole + b"[1, 2]\n",
    ],
)
def test_a_damaged_journal_is_one_line_and_left_as_it_is(tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    damaged = damage(journal_with_a_study(run_dir / JOURNAL_FILE))
    (run_dir / JOURNAL_FILE).write_bytes(damaged)
    (run_dir / RUN_FILE).write_text(json.dumps({"run_dir": str(run_dir), "num_trials": 4, "workload": "digits"}))
    code, err = resume(tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "is damaged at line" in err[0] and "Traceback" not in err[0], err
    assert (run_dir / JOURNAL_FILE).read_bytes() == damaged  # refused, not "repaired"

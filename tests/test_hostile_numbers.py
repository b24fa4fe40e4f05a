"""Numbers that would escape the loaders: an integer of 5000 digits (Python refuses to parse it with a ValueError),
one of 400 (past float's range), NaN, deep nesting, in a policy, a search-space file, a table's run metadata and
the latency log. Each is one UserError line (exit 2), or, for the latency log, a log ignored with one note."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from orchestrator.artifacts.tables import METADATA_KEY, ResultsError, read_table
from orchestrator.cli import main
from orchestrator.measure import latency_log
from orchestrator.policy import Policy, PolicyError
from orchestrator.search.space_options import SpaceError, load_space_file
from tests.test_checkpoint_hostile import TINY
from tests.test_policy import policy_doc, step

DIGITS_5000 = "9" * 5000


def _policy_text(seed: str) -> str:
    return json.dumps(policy_doc(step("quantization", bits=8))).replace('"seed": 0', f'"seed": {seed}')


def test_a_5000_digit_integer_in_a_policy_is_one_policy_error():
    with pytest.raises(PolicyError, match="policy is not valid JSON: Exceeds the limit"):
        Policy.loads(_policy_text(DIGITS_5000))


def test_apply_with_a_5000_digit_policy_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "policy.json").write_text(_policy_text(DIGITS_5000))
    code = main(["apply", "--workload", TINY, "--policy", str(tmp_path / "policy.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_a_5000_digit_integer_in_a_space_file_is_one_space_error(tmp_path):
    (tmp_path / "space.json").write_text(f'{{"choices": {{"bits": [{DIGITS_5000}]}}}}')
    with pytest.raises(SpaceError, match="search-space file .* is not valid JSON"):
        load_space_file(tmp_path / "space.json")


@pytest.mark.parametrize("metadata", [f'{{"complete": {DIGITS_5000}}}', "[1, 2]", "NaN"])
def test_run_metadata_that_is_not_a_json_object_is_one_results_error(tmp_path, metadata):
    table = pa.table({"x": [1]}).replace_schema_metadata({METADATA_KEY: metadata.encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (tmp_path / "trials.parquet").write_bytes(buffer.getvalue())
    with pytest.raises(ResultsError, match="metadata"):
        read_table(str(tmp_path), "trials.parquet")


# ----------------------------------------------------------------------------- the latency log


@pytest.fixture
def log(tmp_path, monkeypatch):
    """(description, path of its log) in a cache of its own; notes said before are forgotten."""
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path))
    monkeypatch.setattr(latency_log, "_NOTED", set(), raising=False)
    torch.manual_seed(0)
    described = latency_log.describe(nn.Linear(4, 2), target="torch", batch_size=1, threads=1, device="cpu")
    path = tmp_path / "latency" / f"{latency_log.key_of(described)}.json"
    path.parent.mkdir()
    return described, path


def _samples(*pairs: str) -> str:
    return '{"baseline": {}, "samples": [' + ", ".join(f"[{t}, {ms}]" for t, ms in pairs) + "]}"


HOSTILE_LOGS = {
    "a 400-digit latency": _samples(("1.0", "2.0"), ("2.0", "9" * 400)),
    "a 400-digit time": _samples(("9" * 400, "2.0")),
    "a 5000-digit latency": _samples(("1.0", DIGITS_5000)),
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "deep nesting inside": '{"samples": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "nan": _samples(("1.0", "NaN")),
    "a float past its range": _samples(("1.0", "2.0"), ("2.0", "1e400")),
    "a femtosecond and a day": _samples(("1.0", "1e-9"), ("2.0", "1e9")),
    "spread over a million times": _samples(("1.0", "0.001"), ("2.0", "1000.0")),
    "a string": _samples(("1.0", '"fast"')),
    "a bool": _samples(("1.0", "true")),
    "a triple": '{"samples": [[1.0, 2.0, 3.0]]}',
    "no samples": '{"samples": 5}',
    "over a megabyte": _samples(*[(f"{1e9 + i}", "2.0") for i in range(60_000)]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LOGS))
def test_an_implausible_latency_log_is_ignored_with_one_note_and_replaced(case, log, capsys):
    described, path = log
    path.write_text(HOSTILE_LOGS[case])
    assert latency_log.observed(described) == []
    assert latency_log.observed(described) == []
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: ignoring the latency log"), notes
    latency_log.append(described, [4.0], at=5.0)
    assert latency_log.observed(described) == [4.0]


def test_a_log_far_from_the_latency_timed_now_is_not_believed_beside_it(log, capsys):
    described, path = log
    path.write_text(_samples(("1.0", "0.1"), ("2.0", "10.0"), ("3.0", "90.0")))  # plausible on its own
    assert latency_log.observed(described) == [0.1, 10.0, 90.0]
    assert latency_log.observed(described, near=10.0) == []  # 0.1 ms beside 10 ms timed now: 100x apart
    assert "beside 10 ms timed now" in capsys.readouterr().err
    assert latency_log.observed(described, near=20.0, before=2.5) == []
    path.write_text(_samples(("1.0", "8.0"), ("2.0", "30.0")))
    assert latency_log.observed(described, near=10.0) == [8.0, 30.0]


def test_implausible_new_latencies_are_not_logged(log):
    described, _ = log
    latency_log.append(described, [1e-9, 10**400, True, 3.0, 1e12], at=1.0)
    assert latency_log.observed(described) == [3.0]


def test_evaluate_with_a_hostile_latency_log_in_the_cache_still_works(log, tmp_path, capsys, monkeypatch):
    """Every log the evaluation would read or append to is the hostile one."""
    from orchestrator import executor
    from orchestrator.artifacts import store
    from tests.test_checkpoint_hostile import make_tiny

    _, path = log
    tiny = make_tiny()
    applied = executor.apply(Policy.from_json(policy_doc(step("quantization", bits=8))), tiny)
    store.save(applied.model, applied.policy, applied.metrics, tiny, str(tmp_path / "ckpt"))
    path.write_text(HOSTILE_LOGS["a 400-digit latency"])
    monkeypatch.setattr(latency_log, "key_of", lambda description: path.stem)
    capsys.readouterr()
    code = main(["evaluate", str(tmp_path / "ckpt"), "--workload", TINY, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("note: ignoring the latency log") == 1, err

"""Numbers that would escape the loaders: an integer of 5000 digits (Python refuses to parse it with a ValueError),
one of 400 (past float's range), NaN, deep nesting, in a policy, a search-space file and a table's run metadata. Each
is one UserError line (exit 2)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.artifacts.tables import METADATA_KEY, ResultsError, read_table
from orchestrator.cli import main
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

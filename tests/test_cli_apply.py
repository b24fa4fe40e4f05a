"""`apply` and `evaluate` from the command line, and every bad input they must reject cleanly."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest

from orchestrator.cli import main
from tests.test_policy import FULL, policy_doc, step

pytestmark = pytest.mark.slow


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits_baseline):
    root = tmp_path_factory.mktemp("cli")
    (root / "policy.json").write_text(json.dumps(FULL))
    code = main(["apply", "--workload", "digits", "--policy", str(root / "policy.json"), "--out", str(root / "ckpt")])
    assert code == 0
    return root / "ckpt"


def test_apply_then_evaluate_reports_the_test_split(checkpoint, capsys):
    code, out, _ = run(capsys, "evaluate", str(checkpoint), "--json")
    assert code == 0
    metrics = json.loads(out)
    recorded = json.loads((checkpoint / "metrics.json").read_text())
    assert metrics["validation"] == recorded["validation"] == metrics["recorded_validation"]
    assert metrics["size_bytes"] == recorded["size_bytes"]
    assert 0.9 <= metrics["test"] <= 1.0


BAD_POLICIES = {
    "malformed.json": ("{", "not valid JSON"),
    "version.json": (json.dumps({**FULL, "_version": 2}), "unsupported policy version"),
    "technique.json": (json.dumps(policy_doc(step("sparsify", x=1))), "unknown technique"),
    "layer.json": (json.dumps(policy_doc(step("quantization", bits={"fc7": 4}))), "no layer 'fc7'"),
    "range.json": (json.dumps(policy_doc(step("unstructured_pruning", sparsity=-0.2))), "sparsity"),
    "order.json": (
        json.dumps(policy_doc(step("quantization", bits=4), step("lowrank", rank=0.5))),
        "cannot follow quantization",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_POLICIES))
def test_bad_policies_exit_2_with_one_line_and_leave_no_output(name, tmp_path, capsys, digits_baseline):
    text, message = BAD_POLICIES[name]
    (tmp_path / name).write_text(text)
    code, out, err = run(capsys, "apply", "--policy", str(tmp_path / name), "--out", str(tmp_path / "out"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_damaged_checkpoints_exit_2_naming_the_file(checkpoint, tmp_path, capsys):
    flipped = tmp_path / "flipped"
    shutil.copytree(checkpoint, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[100] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(data))
    code, _, err = run(capsys, "evaluate", str(flipped))
    assert code == 2 and "model.safetensors is corrupted" in err and len(err.strip().splitlines()) == 1

    missing = tmp_path / "missing"
    shutil.copytree(checkpoint, missing)
    (missing / "policy.json").unlink()
    code, _, err = run(capsys, "evaluate", str(missing))
    assert code == 2 and "policy.json is missing" in err

    code, _, err = run(capsys, "evaluate", str(tmp_path / "nothing-here"))
    assert code == 2 and "is not a checkpoint" in err


def test_checkpoint_from_another_workload_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "other_workload.py").write_text(
        textwrap.dedent(
            """
            import torch
            from orchestrator.workloads.data import Split
            from orchestrator.workloads.digits import DigitsCNN
            from orchestrator.workloads import Workload

            def make():
                x, y = torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
                split = Split(x, y)
                return Workload(name="other", build_model=DigitsCNN, load_baseline=DigitsCNN,
                                splits={s: split for s in ("train", "calibration", "validation", "test")},
                                fingerprint="other-1")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run(capsys, "evaluate", str(checkpoint), "--workload", "other_workload:make")
    assert code == 2 and "belongs to workload 'digits'" in err
    sys.modules.pop("other_workload", None)


def test_apply_refuses_an_existing_output_directory(checkpoint, tmp_path, capsys):
    (tmp_path / "policy.json").write_text(json.dumps(FULL))
    before = sorted(p.name for p in checkpoint.iterdir())
    code, _, err = run(capsys, "apply", "--policy", str(tmp_path / "policy.json"), "--out", str(checkpoint))
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in checkpoint.iterdir()) == before

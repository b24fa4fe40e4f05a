"""Every file in examples/ runs as its README section says, from the repository root, offline."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import orchestrator
from orchestrator import Policy, apply, load_checkpoint, resolve_workload, save_checkpoint
from orchestrator.artifacts.tables import TRIALS_FILE, read_table
from orchestrator.policy import validate_for_model
from orchestrator.search.space import build_space
from orchestrator.search.space_options import load_space_file
from orchestrator.workloads.digits import DigitsCNN
from tests.waiting import HANG_S

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
MY_WORKLOAD = "examples.my_workload:make_workload"
CANONICAL = ["lowrank", "structured_pruning", "unstructured_pruning", "quantization", "distillation"]
MLP_POLICY = {
    "_type": "policy",
    "_version": 1,
    "seed": 0,
    "steps": [
        {"_type": "unstructured_pruning", "_version": 1, "_data": {"sparsity": {"_default": 0.5, "fc2": 0.0}}},
        {"_type": "quantization", "_version": 1, "_data": {"bits": {"_default": 4, "fc2": 8}}},
        {"_type": "distillation", "_version": 1, "_data": {"epochs": 1}},
    ],
}


def run_from_repo(*args: str) -> subprocess.CompletedProcess:
    """A command run as a user would, from the repository root, with the tests' isolated cache."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=HANG_S, env=os.environ
    )


def test_policy_example_uses_every_technique_in_order_on_digits_layers():
    policy = Policy.load(EXAMPLES / "policy.json")
    assert [step.technique for step in policy.steps] == CANONICAL
    validate_for_model(policy, DigitsCNN())


@pytest.mark.slow
def test_policy_example_applies_and_its_checkpoint_evaluates(tmp_path, digits_baseline):
    applied = run_from_repo(
        "-m", "orchestrator", "apply", "--policy", "examples/policy.json", "--out", str(tmp_path / "ckpt"),
        "--workload", "digits",
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr[-3000:]
    evaluated = run_from_repo("-m", "orchestrator", "evaluate", str(tmp_path / "ckpt"), "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout)
    assert metrics["compression_ratio"] > 5 and metrics["test"] > 0.9


def test_search_space_example_builds_for_digits():
    options = load_space_file(EXAMPLES / "search_space.json")
    described = build_space(DigitsCNN(), options).describe()
    assert set(described["groups"]) == {"quantization", "unstructured_pruning"}
    assert "conv1" not in described["groups"]["quantization"]["early"]  # excluded from quantization
    assert described["groups"]["unstructured_pruning"]["head"] == ["fc1", "fc2"]
    assert described["ranges"]["distillation"]["epochs"] == [1, 2]  # short fine-tunes keep the example quick


@pytest.mark.slow
@pytest.mark.ray
def test_search_space_example_runs_a_search(tmp_path, digits_baseline):
    searched = run_from_repo(
        "search.py", "--search-space", "examples/search_space.json", "--num-trials", "3", "--storage-path",
        str(tmp_path), "--name", "ex", "--no-report",
    )  # fmt: skip
    assert searched.returncode == 0, searched.stderr[-3000:]
    trials, _ = read_table(str(tmp_path / "ex"), TRIALS_FILE)
    assert len(trials) == 3 and {row["status"] for row in trials} == {"completed"}


@pytest.mark.slow
def test_my_workload_baseline_from_the_command_line():
    measured = run_from_repo("-m", "orchestrator", "baseline", "--workload", MY_WORKLOAD, "--json")
    assert measured.returncode == 0, measured.stderr[-3000:]
    metrics = json.loads(measured.stdout)
    assert metrics["validation"] > 0.85 and metrics["test"] > 0.85


def test_a_policy_applies_to_my_workload_and_its_checkpoint_reloads(tmp_path):
    workload = resolve_workload(MY_WORKLOAD)
    result = apply(Policy.from_json(MLP_POLICY), workload)
    assert result.metrics["compression_ratio"] > 2
    assert result.metrics["validation"] > result.metrics["baseline_validation"] - 0.05
    checkpoint = load_checkpoint(
        save_checkpoint(result.model, result.policy, result.metrics, workload, str(tmp_path / "c")), workload
    )
    assert workload.evaluate(checkpoint.model) == result.metrics["validation"]
    assert (
        resolve_workload(MY_WORKLOAD).load_baseline().state_dict().keys() == workload.build_model().state_dict().keys()
    )


@pytest.mark.slow
def test_my_workload_checkpoint_from_the_command_line(tmp_path):
    (tmp_path / "policy.json").write_text(json.dumps(MLP_POLICY))
    out = str(tmp_path / "ckpt")
    applied = run_from_repo(
        "-m",
        "orchestrator",
        "apply",
        "--policy",
        str(tmp_path / "policy.json"),
        "--out",
        out,
        "--workload",
        MY_WORKLOAD,
    )
    assert applied.returncode == 0, applied.stderr[-3000:]
    evaluated = run_from_repo("-m", "orchestrator", "evaluate", out, "--workload", MY_WORKLOAD, "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["test"] > 0.8


def code_lines(tree: ast.Module, source: str) -> int:
    """Lines holding code: statements other than the module docstring, comments and blank lines left out."""
    body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body
    numbers = {n for node in body for n in range(node.lineno, node.end_lineno + 1)}
    lines = source.splitlines()
    return sum(1 for n in numbers if lines[n - 1].strip() and not lines[n - 1].strip().startswith("#"))


def test_python_api_example_is_short_and_uses_only_the_public_names():
    source = (EXAMPLES / "python_api.py").read_text()
    tree = ast.parse(source)
    assert code_lines(tree, source) < 15
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in ("orchestrator", "techniques")
        ):
            assert node.module == "orchestrator" and {a.name for a in node.names} <= set(orchestrator.__all__)
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] in ("orchestrator", "techniques") for a in node.names)


@pytest.mark.slow
def test_python_api_example_runs_and_prints_the_compression(digits_baseline):
    ran = run_from_repo("examples/python_api.py")
    assert ran.returncode == 0, ran.stderr[-3000:]
    ratio = re.search(r"compression ratio (\d+\.\d)x", ran.stdout)
    accuracy = re.search(r"validation accuracy (\d\.\d+) \(baseline (\d\.\d+)\)", ran.stdout)
    assert ratio and float(ratio[1]) > 5, ran.stdout
    assert accuracy and float(accuracy[1]) > float(accuracy[2]) - 0.05, ran.stdout


def _code_after_docstring(path: Path) -> str:
    source = path.read_text()
    tree = ast.parse(source)
    return "\n".join(source.splitlines()[tree.body[1].lineno - 1 :]).strip()


def test_notebook_example_is_under_15_lines_uses_public_names_and_is_the_readme_s():
    source = (EXAMPLES / "notebook.py").read_text()
    tree = ast.parse(source)
    assert code_lines(tree, source) < 15
    used = {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "orchestrator"
    }
    assert used and used <= set(orchestrator.__all__)
    assert _code_after_docstring(EXAMPLES / "notebook.py") in (REPO / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.ray
def test_notebook_example_runs_a_search_on_a_dataloader(tmp_path):
    ran = subprocess.run(
        [sys.executable, str(EXAMPLES / "notebook.py")], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    found = re.search(r"(\d+) models on the front: \[(.*)\]", ran.stdout)
    assert found and int(found[1]) >= 1, ran.stdout
    for path in re.findall(r"'([^']+)'", found[2]):
        assert (Path(path) / "metrics.json").exists()
    rows, _ = read_table(str(next((tmp_path / "runs").iterdir())), TRIALS_FILE)
    assert len(rows) == 6


@pytest.mark.slow
def test_sentence_encoder_example_applies_from_the_command_line_and_its_checkpoint_evaluates(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"_type": "policy", "_version": 1, "seed": 0, "steps": [
        {"_type": "quantization", "_version": 1, "_data": {"bits": {"_default": 4}}},
        {"_type": "distillation", "_version": 1, "_data": {"epochs": 1, "lr": 0.001}},
    ]}))  # fmt: skip
    spec = "examples.sentence_encoder:make_workload"
    applied = run_from_repo(
        "-m", "orchestrator", "apply", "--policy", str(policy), "--out", str(tmp_path / "ckpt"), "--workload", spec,
        "--json",
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr[-3000:]
    metrics = json.loads(applied.stdout)
    assert metrics["compression_ratio"] > 3 and metrics["validation"] > 0.9  # mean cosine to the original
    evaluated = run_from_repo("-m", "orchestrator", "evaluate", str(tmp_path / "ckpt"), "--workload", spec, "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["validation"] == pytest.approx(metrics["validation"], abs=1e-9)


def test_sentence_encoder_example_uses_its_hooks():
    from examples.sentence_encoder import cosine_loss, make_workload, mean_pooled

    workload = make_workload()
    assert workload.output_fn is mean_pooled and workload.distill_loss is cosine_loss
    inputs = workload.example_inputs(2)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert workload.forward(workload.load_baseline(), inputs).shape == (2, 64)
    assert workload.evaluate(workload.load_baseline()) == pytest.approx(1.0, abs=1e-5)

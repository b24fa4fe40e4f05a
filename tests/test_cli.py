"""The command line: subcommands, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator.cli import main
from tests.waiting import HANG_S


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=HANG_S,
    )


def test_help_lists_every_subcommand_and_each_has_its_own_usage():
    import argparse

    from orchestrator.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    result = run_cli("--help")
    assert result.returncode == 0
    for choice in commands._choices_actions:  # each subcommand, with the one-line help it was given
        assert choice.help and f"{choice.dest}" in result.stdout and choice.help in result.stdout
    for name in commands.choices:
        sub = run_cli(name, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: python -m orchestrator {name}"), name


@pytest.mark.slow
def test_baseline_prints_measurements_as_json(digits_baseline, capsys):
    assert main(["baseline", "--workload", "digits", "--json", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["test"] >= 0.97
    assert metrics["size_bytes"] > 0 and metrics["latency_ms"] > 0 and metrics["flops"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workload", "nope"], "unknown workload"),
        (["--workload", "not_a_module_xyz:f"], "cannot import"),
        (["--workload", "cifar10", "--data-dir", "/no/such/dir"], "does not exist"),
        (["--workload", "cifar10"], "needs --data-dir"),
        (["--device", "cuda:7"], "CUDA"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = run_cli("baseline", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_apply_on_a_deployment_target_shows_pytorchs_score_and_the_export_difference_beside_the_deployed_one():
    from orchestrator.cli._format import _deployed

    deployed = {"torch_validation": 0.9889, "export_max_abs_diff": 0.0245, "export_tolerance": 0.01}
    lines = _deployed({**deployed, "export_check_passed": False})
    assert lines[0].startswith("PyTorch validation   0.9889") and "0.0245, BEYOND tolerance 0.01" in lines[1]
    assert "within tolerance" in _deployed({**deployed, "export_max_abs_diff": 0.001, "export_check_passed": True})[1]
    assert "not finite" in _deployed({**deployed, "export_max_abs_diff": None})[1]
    assert _deployed({"validation": 0.98}) == []  # torch target: nothing beside

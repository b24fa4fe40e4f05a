"""The command line's surface: --version, help with defaults and exit codes, usage errors with "did you
mean", the accuracy-guard and tracking flags, and the dashboard subcommand."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest

from orchestrator.cli import build_parser, main, search_main
from orchestrator.cli._search import config_from_args
from orchestrator.errors import UserError
from orchestrator.search.config import DEFAULTS
from tests.waiting import HANG_S, wait_for

ROOT = Path(__file__).resolve().parents[1]
EXIT_CODE_LINES = [
    "exit codes:",
    "  0    success",
    "  1    unexpected internal error (a bug: please report it)",
    "  2    bad input or a condition you can fix (one `error:` line)",
    "  130  interrupted (Ctrl-C; a search is resumable with --resume)",
    "  143  stopped by SIGTERM (as by Ctrl-C: resumable with --resume)",
]
# Each command line runs once, all at once (each start imports torch, a few seconds).
COMMANDS = {
    "version": ["-m", "orchestrator", "--version"],
    "search.py version": ["search.py", "--version"],
    "search.py typo": ["search.py", "--num-trail", "5"],
    "apply typo": ["-m", "orchestrator", "apply", "--polcy", "x", "--out", "y"],
    "subcommand typo": ["-m", "orchestrator", "evalute", "ckpt/"],
}


@pytest.fixture(scope="module")
def ran() -> dict[str, subprocess.CompletedProcess]:
    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=HANG_S)

    with ThreadPoolExecutor(min(len(COMMANDS), os.cpu_count() or 1)) as pool:
        return dict(zip(COMMANDS, pool.map(run, COMMANDS.values()), strict=True))


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("key", ["version", "search.py version"])
def test_version_names_the_installed_distribution(ran, key):
    result = ran[key]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"compression-orchestrator {metadata.version('compression-orchestrator')}"


def test_every_option_of_every_subcommand_has_help_that_shows_its_default():
    parser = build_parser()
    for name, sub in {"": parser, **subparsers(parser)}.items():
        sub.format_help()  # every help string formats (no stray %)
        formatter = sub.formatter_class(sub.prog)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            shown = formatter._get_help_string(action)
            assert action.help and action.help.strip(), f"{name} {action.dest} has no help"
            if action.option_strings:
                assert "default:" in shown or "(required)" in shown, f"{name} {action.option_strings}: {shown}"


def test_help_shows_concrete_defaults():
    search = build_parser(search_prog="python search.py")
    text = " ".join(subparsers(search)["search"].format_help().split())
    for expected in ["(default: tpe)", "(default: 0)", "(default: 1.0)", "(default: 0.05)", "(default: off)"]:
        assert expected in text
    assert "`none` disables the guard" in text and "log to Weights & Biases (offline mode" in text
    assert "MLflow (default store: mlruns/ beside the run directory)" in text


def test_top_level_and_search_help_end_with_the_exit_codes(capsys):
    assert build_parser().format_help().rstrip().splitlines()[-len(EXIT_CODE_LINES) :] == EXIT_CODE_LINES
    with pytest.raises(SystemExit) as exit_:
        search_main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: python search.py")
    assert out.rstrip().splitlines()[-len(EXIT_CODE_LINES) :] == EXIT_CODE_LINES


@pytest.mark.parametrize(
    "key, usage, hint",
    [
        ("search.py typo", "usage: python search.py", "did you mean --num-trials?"),
        ("apply typo", "usage: python -m orchestrator apply", "did you mean --policy?"),
        ("subcommand typo", "usage: python -m orchestrator [-h]", "did you mean evaluate?"),
    ],
)
def test_a_usage_error_shows_that_commands_usage_and_a_suggestion(ran, key, usage, hint):
    result = ran[key]
    lines = result.stderr.rstrip("\n").splitlines()
    assert result.returncode == 2
    assert lines[0].startswith(usage)
    assert all(line.startswith(" ") for line in lines[1:-1]), result.stderr  # usage lines, then one error line
    assert lines[-1].startswith("error: ") and hint in lines[-1]


def test_the_search_subcommand_shows_its_own_usage_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--num-trail", "5"])
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and lines[0].startswith("usage: python -m orchestrator search [-h]")
    assert lines[-1] == "error: unrecognized argument --num-trail: did you mean --num-trials?"


def test_a_misspelled_choice_is_suggested_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--sampler", "tpee"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("did you mean tpe?")


def search_config(*flags: str):
    return config_from_args(build_parser().parse_args(["search", *flags]))


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], DEFAULTS["max_accuracy_drop"]),
        (["--max-accuracy-drop", "0.01"], 0.01),
        (["--max-accuracy-drop", "0"], 0.0),
        (["--max-accuracy-drop", "1"], 1.0),
        (["--max-accuracy-drop", "none"], None),
        (["--max-accuracy-drop", "NONE"], None),
        (["--max-accuracy-drop=None"], None),
    ],
)
def test_the_accuracy_guard_is_a_fraction_or_none(flags, expected):
    assert search_config(*flags).strategy.max_accuracy_drop == expected


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "1.5", "inf", ""])
def test_a_bad_accuracy_guard_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["search", f"--max-accuracy-drop={value}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: argument --max-accuracy-drop: a fraction")


@pytest.mark.parametrize(
    "flags, mlflow, wandb",
    [
        ([], None, False),
        (["--mlflow"], "", False),
        (["--mlflow", "http://127.0.0.1:5000"], "http://127.0.0.1:5000", False),
        (["--mlflow", "--wandb"], "", True),
        (["--wandb"], None, True),
    ],
)
def test_tracking_flags_reach_the_search_config(flags, mlflow, wandb):
    config = search_config(*flags)
    assert (config.run.mlflow, config.run.wandb) == (mlflow, wandb)


def test_the_trial_budget_is_left_to_the_run_unless_given():
    assert search_config().strategy.num_trials is None  # a new run's default, or the resumed run's own budget
    assert search_config("--num-trials", "7").strategy.num_trials == 7
    assert search_config("--smoke-test").strategy.num_trials == 6
    assert search_config("--smoke-test", "--num-trials", "3").strategy.num_trials == 3


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_the_dashboard_needs_a_run_directory_with_a_journal(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path)]) == 2
    assert "no Optuna journal at" in one_error_line(capsys)


def test_the_dashboard_without_optuna_dashboard_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "optuna-journal.log").touch()
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # `import optuna_dashboard` fails
    assert main(["dashboard", str(tmp_path)]) == 2
    expected = "error: the dashboard needs optuna-dashboard: pip install 'compression-orchestrator[dashboard]'"
    assert one_error_line(capsys) == expected


@pytest.mark.parametrize("host, warned", [(None, False), ("localhost", False), ("::1", False), ("0.0.0.0", True)])
def test_the_dashboard_binds_loopback_unless_told_and_warns_otherwise(tmp_path, capsys, monkeypatch, host, warned):
    from orchestrator.cli import _dashboard

    (tmp_path / "optuna-journal.log").touch()
    fake = types.SimpleNamespace(wsgi=lambda storage: ("app", storage))
    monkeypatch.setitem(sys.modules, "optuna_dashboard", fake)
    served = []
    monkeypatch.setattr(_dashboard, "serve", lambda app, host, port: served.append((app[0], host, port)))
    assert main(["dashboard", str(tmp_path), *(["--host", host] if host else []), "--port", "9999"]) == 0
    assert served == [("app", host or "127.0.0.1", 9999)]
    err = capsys.readouterr().err
    assert (err.startswith("warning: listening on 0.0.0.0, not a loopback address") and err.count("\n") == 1) == warned
    assert warned or err == ""


def test_a_port_in_use_is_one_line():
    from orchestrator.cli._dashboard import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1:"):
            serve(lambda environ, start_response: [], "127.0.0.1", taken.getsockname()[1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_journal(run_dir: Path) -> None:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(run_dir / "optuna-journal.log")))
    study = optuna.create_study(study_name="tiny", storage=storage, directions=["maximize", "minimize"])
    study.optimize(lambda trial: (trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)), n_trials=2)


def studies(port: int) -> list[str] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=60) as response:
            return [s["study_name"] for s in json.load(response)["study_summaries"]]
    except OSError:
        return None


@pytest.mark.slow
def test_the_dashboard_serves_the_runs_study(tmp_path):
    pytest.importorskip("optuna_dashboard")
    tiny_journal(tmp_path)
    port = free_port()
    command = [sys.executable, "-m", "orchestrator", "dashboard", str(tmp_path), "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    found = None

    def answered() -> bool:  # the server answers, or has exited: either way, waiting longer would not help
        nonlocal found
        found = studies(port)
        return found is not None or process.poll() is not None

    try:
        wait_for(answered, f"the dashboard to answer on port {port}", poll_s=0.5)
        assert found == ["tiny"], f"served {found}; exit code {process.poll()}"
    finally:
        process.terminate()
        out, err = process.communicate(timeout=HANG_S)
    assert f"optuna-dashboard on http://127.0.0.1:{port}/" in out
    assert "warning" not in err

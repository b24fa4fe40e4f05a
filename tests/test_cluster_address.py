"""Cluster mode without a cluster: where a search runs (flags and RAY_ADDRESS, as Ray's tools read them), the
notice about a cluster on this machine, the console line, the journal kept on remote storage, and how a trial on
a node that cannot write the run directory stops the search. Nothing here starts Ray."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.search import preflight, ray_session
from orchestrator.search.journal_sync import JournalMirror, pull_journal, push_journal
from orchestrator.search.prepare import JOURNAL_FILE, RUN_FILE
from orchestrator.search.ray_session import RayTarget, cluster_notice, ray_target, where_trials_run
from orchestrator.search.stopping import StopOnFatalTrialError, unwritable_node

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("flag", "environment", "expected"),
    [
        (None, None, RayTarget(None, "")),  # nothing given: a private Ray
        (None, "auto", RayTarget("auto", "RAY_ADDRESS")),  # a cluster-launcher head (cluster.yaml exports it)
        (None, "10.0.0.5:6379", RayTarget("10.0.0.5:6379", "RAY_ADDRESS")),  # Ray Jobs, KubeRay
        (None, "local", RayTarget(None, "RAY_ADDRESS")),
        (None, "  ", RayTarget(None, "")),
        ("auto", "10.0.0.5:6379", RayTarget("auto", "--address")),  # the flag wins (Ray reads the variable for auto)
        ("10.0.0.7:6379", "10.0.0.5:6379", RayTarget("10.0.0.7:6379", "--address")),
        ("local", "10.0.0.5:6379", RayTarget(None, "--address")),  # forces a private Ray
        ("ray://10.0.0.5:10001", None, RayTarget("ray://10.0.0.5:10001", "--address")),
    ],
)
def test_where_a_search_runs_follows_rays_convention(flag, environment, expected):
    environ = {} if environment is None else {"RAY_ADDRESS": environment}
    assert ray_target(flag, environ) == expected
    assert ray_target(flag, environ).private == (expected.address is None)


@pytest.fixture
def ray_temp_dir(tmp_path, monkeypatch) -> Path:
    """Ray's default temp dir for this test, where `ray start` records the cluster it started."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray"


def test_the_notice_names_a_cluster_that_answers_on_this_machine(ray_temp_dir):
    assert cluster_notice() == ""  # nothing recorded
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        (ray_temp_dir / "ray_current_cluster").write_text(address)
        notice = cluster_notice()
    assert notice.count("\n") == 0
    assert f"private local Ray, not on the Ray cluster at {address}" in notice
    assert "--address auto" in notice and "RAY_ADDRESS=auto" in notice
    assert cluster_notice() == ""  # recorded, but gone: a dead cluster is not mentioned
    (ray_temp_dir / "ray_current_cluster").write_text("not an address")
    assert cluster_notice() == ""


def _ray_holding(monkeypatch, nodes: int, resources: dict, *, started_here: bool, gcs: str | None) -> None:
    import ray

    monkeypatch.setattr(ray_session, "autoscaled", lambda: False)

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * nodes + [{"Alive": False}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    monkeypatch.setattr(ray_session, "_started_here", lambda: started_here)
    monkeypatch.setattr(ray_session, "_gcs_address", lambda: gcs)


def test_the_console_says_where_the_trials_run(monkeypatch):
    _ray_holding(monkeypatch, 1, {"CPU": 2.0}, started_here=True, gcs="127.0.0.1:1234")
    assert where_trials_run(RayTarget(None)) == "trials run on: local private Ray, 2 CPUs"
    _ray_holding(monkeypatch, 1, {"CPU": 8.0, "GPU": 1.0}, started_here=True, gcs="127.0.0.1:1234")
    assert where_trials_run(RayTarget(None, "--address")) == "trials run on: local private Ray, 8 CPUs, 1 GPU"
    _ray_holding(monkeypatch, 3, {"CPU": 8.0, "GPU": 2.0}, started_here=False, gcs="10.0.0.5:6379")
    assert where_trials_run(RayTarget("auto", "RAY_ADDRESS")) == (
        "trials run on: cluster at 10.0.0.5:6379 (RAY_ADDRESS=auto), 3 nodes, 8 CPUs, 2 GPUs"
    )
    assert where_trials_run(RayTarget("10.0.0.5:6379", "--address")) == (
        "trials run on: cluster at 10.0.0.5:6379, 3 nodes, 8 CPUs, 2 GPUs"
    )
    _ray_holding(monkeypatch, 1, {}, started_here=False, gcs=None)  # a Ray Client connection; a CPU-less head
    assert where_trials_run(RayTarget("ray://h:10001", "--address")) == (
        "trials run on: cluster at ray://h:10001, 1 node, 0 CPUs, 0 GPUs"
    )
    monkeypatch.setattr(ray_session, "autoscaled", lambda: True)  # cluster.yaml's CPU-less head, before any worker
    assert where_trials_run(RayTarget("auto", "RAY_ADDRESS")).endswith(
        "1 node, 0 CPUs, 0 GPUs; the autoscaler adds nodes as trials wait"
    )


@pytest.mark.slow
def test_an_unreachable_ray_address_is_one_line_before_anything_starts(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = {**_environ(), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    done = subprocess.run(
        [sys.executable, "search.py", "--storage-path", str(tmp_path / "runs")],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: RAY_ADDRESS 127.0.0.1:{port}: ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ORCHESTRATOR_PAUSE_AT")}


# ---- the journal of a run on remote storage ----


def _uri(path: Path) -> str:
    return f"file://{path}"


def test_the_journal_goes_to_the_run_directory_and_comes_back_on_a_fresh_head(tmp_path):
    run_dir = _uri(tmp_path / "bucket" / "run")
    head_a = tmp_path / "head-a" / "journal.log"
    head_a.parent.mkdir()
    head_a.write_bytes(b'{"op": 0}\n')
    push_journal(str(head_a), run_dir)
    assert (tmp_path / "bucket" / "run" / JOURNAL_FILE).read_bytes() == b'{"op": 0}\n'

    fresh = tmp_path / "head-b" / "journal.log"  # a new head: its cache is empty
    assert pull_journal(run_dir, str(fresh)) == "downloaded"
    assert fresh.read_bytes() == b'{"op": 0}\n'
    assert pull_journal(run_dir, str(fresh)) == ""  # the same: nothing to do

    fresh.write_bytes(b'{"op": 0}\n{"op": 1}\n')  # this head got further than its last upload
    assert pull_journal(run_dir, str(fresh)) == "kept local"
    assert fresh.read_bytes() == b'{"op": 0}\n{"op": 1}\n'

    push_journal(str(fresh), run_dir)
    head_a.write_bytes(b'{"op": 0}\n')  # an older head that comes back: the run directory's copy extends it
    assert pull_journal(run_dir, str(head_a)) == "downloaded"
    assert head_a.read_bytes() == b'{"op": 0}\n{"op": 1}\n'


def test_a_local_journal_that_disagrees_is_set_aside_and_said(tmp_path, capsys):
    run_dir = _uri(tmp_path / "bucket" / "run")
    (tmp_path / "bucket" / "run").mkdir(parents=True)
    (tmp_path / "bucket" / "run" / JOURNAL_FILE).write_bytes(b'{"op": 0}\n{"op": 1}\n')
    local = tmp_path / "cache" / "journal.log"
    local.parent.mkdir()
    local.write_bytes(b'{"op": 0}\n{"op": 9}\n')  # another head's history
    aside = pull_journal(run_dir, str(local))
    assert Path(aside).read_bytes() == b'{"op": 0}\n{"op": 9}\n'
    assert local.read_bytes() == b'{"op": 0}\n{"op": 1}\n'
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disagreed" in err and aside in err


def test_the_mirror_uploads_after_each_trial_and_a_failed_upload_does_not_stop_the_search(tmp_path, capsys):
    local = tmp_path / "journal.log"
    local.write_bytes(b"one\n")
    (tmp_path / "file").write_text("a file where the run directory should be")
    broken = JournalMirror(str(local), _uri(tmp_path / "file" / "run"))
    broken.on_trial_complete(0, [], None)
    broken.on_trial_error(0, [], None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: could not upload the journal")
    mirror = JournalMirror(str(local), _uri(tmp_path / "run"))
    mirror.on_trial_complete(0, [], None)
    local.write_bytes(b"one\ntwo\n")
    mirror.on_trial_error(0, [], None)
    assert (tmp_path / "run" / JOURNAL_FILE).read_bytes() == b"one\ntwo\n"


# ---- a node that cannot write the run directory ----


def test_a_node_that_cannot_write_says_so_in_one_line(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    assert "does not see the run's run.json" in preflight.node_problem(run_dir, "n1")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps({"num_trials": 2}))
    assert preflight.node_problem(run_dir, "n1") == ""
    assert list((tmp_path / "run" / preflight.PREFLIGHT_DIR).iterdir()) == []  # the marker is removed
    monkeypatch.setenv(preflight.SIMULATE_UNWRITABLE, "1")
    assert preflight.node_problem(run_dir, "n1").startswith("PermissionError: [simulated] permission denied")
    assert "IamInstanceProfile" in preflight.setup_hint("s3://bucket/runs/x")


def _trial(tmp_path: Path, text: str) -> SimpleNamespace:
    error = tmp_path / "error.txt"
    error.write_text(text)
    return SimpleNamespace(error_file=str(error))


TRACEBACK = (
    "Failure # 1 (occurred at 2026-12-07_10-00-00)\n"
    "ray::ImplicitFunc.train() (pid=1, ip=10.0.0.9, actor_id=ab, repr=run_checked_trial)\n"
    '  File "orchestrator/search/preflight.py", line 160, in check_this_node\n'
    "orchestrator.search.preflight.NodeCannotWrite: node 5f3a (10.0.0.9) cannot write to s3://b/r: "
    "PermissionError: denied; give the workers an IAM instance profile\n"
)


def test_the_stopper_stops_at_the_first_trial_on_a_node_that_cannot_write(tmp_path):
    assert unwritable_node(TRACEBACK) == (
        "node 5f3a (10.0.0.9) cannot write to s3://b/r: PermissionError: denied; give the workers an IAM instance "
        "profile"
    )
    guard = StopOnFatalTrialError()
    guard.on_trial_error(0, [], _trial(tmp_path, "Failure # 1\nValueError: something else\n"))
    assert not guard.stop_all()
    guard.on_trial_recover(0, [], _trial(tmp_path, TRACEBACK))  # Tune would retry it: stop now instead
    assert guard.stop_all() and guard.unwritable.startswith("node 5f3a")
    assert not guard.full


def test_a_full_disk_still_waits_for_the_last_failure(tmp_path):
    guard = StopOnFatalTrialError()
    guard.on_trial_recover(0, [], _trial(tmp_path, "OSError: [Errno 28] No space left on device\n"))
    assert not guard.stop_all()  # the retry's failure is told to the study, then the search stops
    guard.on_trial_error(0, [], _trial(tmp_path, "OSError: [Errno 28] No space left on device\n"))
    assert guard.stop_all() and guard.full


def test_the_in_trial_check_remembers_only_a_success(tmp_path, monkeypatch):
    import ray

    (tmp_path / "run.json").write_text("{}")
    monkeypatch.setattr(preflight, "_WRITTEN_FROM_HERE", set())
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "n1"))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.9")
    monkeypatch.setenv(preflight.SIMULATE_UNWRITABLE, "1")
    with pytest.raises(preflight.NodeCannotWrite, match=r"^node n1 \(10\.0\.0\.9\) cannot write to .*simulated"):
        preflight.check_this_node(str(tmp_path))
    monkeypatch.delenv(preflight.SIMULATE_UNWRITABLE)
    preflight.check_this_node(str(tmp_path))
    monkeypatch.setenv(preflight.SIMULATE_UNWRITABLE, "1")
    preflight.check_this_node(str(tmp_path))  # this process checked it once: not again


def test_a_cluster_that_refuses_this_process_is_one_line(monkeypatch):
    import ray

    from orchestrator.errors import UserError

    def refuse(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}.")

    def no_token(**kwargs):
        raise ray.exceptions.AuthenticationError("Token authentication is enabled but no token was found")

    config = SimpleNamespace(extra_ray_init={})
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(UserError) as raised:
        ray_session._init_ray(config, RayTarget("10.0.0.5:6379", "RAY_ADDRESS"), False)
    message = str(raised.value)
    assert message.startswith("RAY_ADDRESS 10.0.0.5:6379: Failed to connect to Ray cluster at 10.0.0.5:6379; if ")
    assert "RAY_AUTH_MODE=token" in message and "--address local" in message
    with pytest.raises(UserError) as raised:  # nothing found on this node: no word of tokens
        ray_session._init_ray(config, RayTarget("auto", "--address"), False)
    assert "token" not in str(raised.value)
    monkeypatch.setattr(ray, "init", no_token)
    with pytest.raises(UserError, match=r"^--address 10\.0\.0\.5:6379: this cluster uses token authentication"):
        ray_session._init_ray(config, RayTarget("10.0.0.5:6379", "--address"), False)


def test_a_full_disk_is_not_taken_for_a_node_set_up_wrong(tmp_path, monkeypatch):
    import errno
    import os

    (tmp_path / "run.json").write_text("{}")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(preflight, "write_atomic", full)
    with pytest.raises(OSError, match="No space left on device"):  # the full-disk path handles it, as before
        preflight.node_problem(str(tmp_path), "n1")

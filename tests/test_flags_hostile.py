"""Hostile flags and paths: each is one `error:` line and exit 2 before anything is created or Ray starts."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from orchestrator.cli import main, search_main
from orchestrator.errors import UserError
from orchestrator.search import driver, preflight
from orchestrator.search.preflight import check_address, check_trial_fits, parse_address


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_search(monkeypatch):
    """A search that gets past its checks fails the test: nothing may be created, no Ray started."""

    def past_the_checks(*args, **kwargs):
        raise AssertionError("the search went past its checks")

    monkeypatch.setattr(driver, "directory_lock", past_the_checks)
    monkeypatch.setattr(driver, "start_ray", past_the_checks)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--storage-path", "{file}"], "--storage-path"),
        (["--storage-path", "/proc/sys/none"], "--storage-path"),
        (["--cpus-per-trial", "nan"], "--cpus-per-trial"),
        (["--cpus-per-trial", "inf"], "--cpus-per-trial"),
        (["--cpus-per-trial", "1e30"], "--cpus-per-trial"),
        (["--cpus-per-trial", "1e-30"], "--cpus-per-trial"),
        (["--gpus-per-trial", "nan"], "--gpus-per-trial"),
        (["--seed", "99999999999999999999999999"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--num-trials", "0", "--smoke-test"], "--num-trials"),
        (["--objectives", "accuracy,accuracy,size"], "--objectives"),
        (["--address", "256.1.1.1:1"], "--address"),
        (["--address", "127.0.0.1:{closed}"], "--address"),
        (["--mlflow", "bogus://x/y"], "--mlflow"),
        (["--mlflow", "http://127.0.0.1:{closed}"], "--mlflow"),
    ],
)
def test_a_hostile_search_flag_is_one_line_before_anything_starts(flags, named, tmp_path, capsys, no_search):
    file = tmp_path / "file"
    file.write_text("")
    flags = [flag.format(file=file, closed=closed_port()) for flag in flags]
    storage = [] if "--storage-path" in flags else ["--storage-path", str(tmp_path / "runs")]
    assert search_main([*flags, *storage]) == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_storage_under_a_file_names_the_file(tmp_path, capsys, no_search):
    (tmp_path / "file").write_text("")
    assert search_main(["--storage-path", str(tmp_path / "file" / "runs")]) == 2
    assert f"{tmp_path / 'file'} is not a directory" in one_error_line(capsys)


@pytest.mark.parametrize(
    "address",
    ["256.1.1.1:1", "host", "host:0", "host:65536", "host:", ":6379", "ray://host", "a..b:1", "::1:6379"],
)
def test_a_malformed_address_is_refused_without_a_connection(address, monkeypatch):
    monkeypatch.setattr(preflight, "connect_problem", pytest.fail)
    with pytest.raises(UserError, match="^--address .* is not HOST:PORT"):
        check_address(address)


def test_addresses_ray_takes_parse_and_a_listening_port_passes():
    assert parse_address("[::1]:6379") == ("::1", 6379)
    assert parse_address("ray://head.example.com:10001") == ("head.example.com", 10001)
    check_address(None)
    check_address("local")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_address(f"127.0.0.1:{server.getsockname()[1]}", 2.0)


def test_auto_checks_ray_address_from_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_address("auto")  # Ray itself says at once when this node has no cluster
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    with pytest.raises(UserError, match="^RAY_ADDRESS 127.0.0.1:"):
        check_address("auto", 2.0)


def test_an_address_that_does_not_answer_is_refused_within_the_timeout(monkeypatch):
    asked = []

    def silent(address, timeout):
        asked.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(UserError, match="^--address 10.0.0.5:6379: no answer within 1.5 s; start the cluster"):
        check_address("10.0.0.5:6379", 1.5)
    assert asked == [1.5]


def test_a_tracking_store_must_be_writable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="^--mlflow file:"):
        preflight.check_tracking_uri(f"file://{tmp_path}/file/mlruns")
    with pytest.raises(UserError, match="^--mlflow http://:80"):
        preflight.check_tracking_uri("http://:80")
    preflight.check_tracking_uri(f"file://{tmp_path}/mlruns")
    preflight.check_tracking_uri("sqlite:///mlflow.db")
    preflight.check_tracking_uri("")


# --------------------------------------------------------------------------- trials that fit no node


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    """A fake Ray cluster: set `nodes` (each node's resources) and `node_types` (what an autoscaler may add)."""
    import ray

    fake = SimpleNamespace(nodes=[{"CPU": 2.0}], node_types=[])
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in fake.nodes])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": sum(n.get("CPU", 0) for n in fake.nodes)})
    monkeypatch.setattr(preflight, "_node_types", lambda: fake.node_types)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cluster launcher's bootstrap config
    return fake


def test_a_trial_no_node_can_hold_is_refused_naming_what_the_cluster_has(cluster):
    check_trial_fits(2, 0)
    with pytest.raises(UserError) as caught:
        check_trial_fits(64, 0)
    message = str(caught.value)
    assert "--cpus-per-trial" in message and "1 node with 2 CPUs and 0 GPUs in all" in message
    cluster.nodes = [{"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}]
    check_trial_fits(1, 1)
    with pytest.raises(UserError, match="at most 8 CPUs and 1 GPUs on one"):
        check_trial_fits(2, 1)  # 9 CPUs and a GPU in all, but no node has both


def test_a_node_type_the_autoscaler_may_start_is_enough(cluster, tmp_path):
    cluster.nodes = [{"CPU": 0.0}]  # a head that runs no trial, no worker yet
    cluster.node_types = [{"CPU": 4.0, "GPU": 1.0}]
    check_trial_fits(4, 1)
    with pytest.raises(UserError):
        check_trial_fits(8, 1)
    cluster.node_types = []
    (tmp_path / "ray_bootstrap_config.yaml").write_text("")  # the cluster launcher's head: it adds nodes
    check_trial_fits(8, 1)


@pytest.mark.ray
def test_a_real_local_ray_reports_what_it_has(monkeypatch, tmp_path):
    import ray

    from orchestrator.search import preflight

    # a machine that was once a cluster launcher's head keeps its config in ~: this Ray is not that cluster
    monkeypatch.setattr(preflight, "LAUNCHER_CONFIG", str(tmp_path / "ray_bootstrap_config.yaml"))
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        check_trial_fits(2, 0)
        with pytest.raises(UserError, match="at most 2 CPUs and 0 GPUs on one"):
            check_trial_fits(64, 0)
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- export paths


@pytest.mark.parametrize(
    "where, named",
    [
        ({"--out": "/proc/m.onnx"}, "--out /proc/m.onnx"),
        ({"--report": "/proc/r.json"}, "--report /proc/r.json"),
        ({"--out": "{file}/m.onnx"}, "--out {file}/m.onnx: {file} is not a directory"),
        ({"--report": "{out}"}, "--report {out} is the --out path"),
    ],
)
def test_an_export_path_that_cannot_be_written_is_refused_before_any_work(where, named, tmp_path, capsys):
    file, out = tmp_path / "file", str(tmp_path / "m.onnx")
    file.write_text("")
    paths = {"--out": out, **where}
    flags = [item.format(file=file, out=out) for pair in paths.items() for item in pair]
    assert main(["export", str(tmp_path / "no-checkpoint"), *flags]) == 2  # the checkpoint is never read
    assert one_error_line(capsys).startswith(f"error: {named.format(file=file, out=out)}")


def test_an_export_is_never_left_without_its_report(tmp_path, monkeypatch):
    from orchestrator.export import _run

    written = SimpleNamespace(data=b"onnx", layers=[], inputs=["x"], outputs=["y"], runtime="ort")
    monkeypatch.setattr(_run, "export_onnx", lambda *args, **kwargs: written)
    monkeypatch.setattr(_run, "_check", lambda *args: {"passed": True})
    real_write = _run.write_atomic

    def write(location, name, data):
        if name.endswith(".json"):
            raise PermissionError(13, "Permission denied", f"{location}/{name}")
        return real_write(location, name, data)

    monkeypatch.setattr(_run, "write_atomic", write)
    workload = SimpleNamespace(name="fake", example_inputs=lambda n: torch.zeros(n, 2))
    with pytest.raises(PermissionError):
        _run.export_model(nn.Linear(2, 2), workload, out=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- dashboard


@pytest.mark.parametrize("journal", [b"garbage\ngarbage\n", b"garbage\n", b'{"op_code": 99}\n', b"[1, 2]\n\xff\n"])
def test_a_garbage_journal_is_one_line_and_no_server(journal, tmp_path, capsys, monkeypatch):
    pytest.importorskip("optuna_dashboard")
    from orchestrator.cli import _dashboard

    monkeypatch.setattr(_dashboard, "serve", pytest.fail)
    (tmp_path / "optuna-journal.log").write_bytes(journal)
    assert main(["dashboard", str(tmp_path)]) == 2
    assert "optuna-journal.log" in one_error_line(capsys)


def test_apply_refuses_a_seed_no_generator_takes_before_loading_the_workload(tmp_path, capsys, monkeypatch):
    import orchestrator.workloads

    monkeypatch.setattr(orchestrator.workloads, "resolve_workload", pytest.fail)
    policy = tmp_path / "policy.json"
    policy.write_text('{"_type": "policy", "_version": 1, "seed": 0, "steps": []}')
    assert main(["apply", "--policy", str(policy), "--out", str(tmp_path / "ckpt"), "--seed", "-1"]) == 2
    assert "seed must be an integer in [0, 4294967295], got -1" in one_error_line(capsys)

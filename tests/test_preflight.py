"""The storage preflight: every node of a (simulated) cluster must write to the run directory before trials."""

from __future__ import annotations

import pytest

from orchestrator.errors import UserError
from orchestrator.search import preflight
from orchestrator.search.preflight import alive_nodes, check_storage_writable, setup_hint, verify_nodes
from tests.waiting import HANG_S, simulated_cluster

UNWRITABLE = "unwritable_storage"  # a custom resource marking the simulated node that cannot write


@pytest.fixture(scope="module")
def cluster():
    """A CPU-less head and two workers on this machine (they share its disk, as NFS nodes would)."""
    import ray

    ray.shutdown()
    simulated = simulated_cluster({"num_cpus": 1}, {"num_cpus": 1, "resources": {UNWRITABLE: 1}})
    ray.init(address=simulated.address, include_dashboard=False, log_to_driver=False)
    yield simulated
    ray.shutdown()
    simulated.shutdown()


def unwritable_node() -> dict:
    import ray

    return next(n for n in ray.nodes() if n["Alive"] and UNWRITABLE in n["Resources"])


def refuse(*args, **kwargs):
    raise AssertionError("Ray was asked")


@pytest.fixture
def every_node_answers(monkeypatch):
    """The checks wait for every node's answer: a loaded machine may take minutes to start a node's worker."""
    monkeypatch.setattr(preflight, "TIMEOUT_S", HANG_S)


def test_single_node_local_run_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_ray_running", lambda: False)
    monkeypatch.setattr(preflight, "alive_nodes", refuse)
    monkeypatch.setattr(preflight, "verify_nodes", refuse)
    check_storage_writable(str(tmp_path / "run"), address_given=False)
    assert not (tmp_path / "run").exists()


def test_remote_uri_without_ray_is_checked_from_this_process(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_ray_running", lambda: False)
    monkeypatch.setattr(preflight, "verify_nodes", refuse)
    check_storage_writable(f"file://{tmp_path}/run", address_given=False)
    assert list((tmp_path / "run").iterdir()) == []  # written, then removed
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="this machine cannot write to file://.*file/run"):
        check_storage_writable(f"file://{tmp_path}/file/run", address_given=False)


@pytest.mark.ray
def test_single_node_local_ray_starts_no_task(tmp_path, monkeypatch):
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    started = []
    monkeypatch.setattr(preflight, "verify_nodes", lambda *args, **kwargs: started.append(args))
    try:
        for address_given in (False, True):
            check_storage_writable(str(tmp_path / "run"), address_given=address_given)
    finally:
        ray.shutdown()
    assert started == [] and not (tmp_path / "run").exists()


@pytest.mark.ray
def test_shared_local_path_passes_on_every_node_and_leaves_nothing(cluster, tmp_path, monkeypatch, every_node_answers):
    assert len(alive_nodes()) == 3
    ran, check = tmp_path / "ran", preflight.write_marker
    ran.mkdir()

    def recorded(run_dir: str, node_id: str, token: str, **kwargs) -> str:  # on the node: where it really ran
        import ray

        (ran / node_id).write_text(ray.get_runtime_context().get_node_id())
        return check(run_dir, node_id, token, **kwargs)

    monkeypatch.setattr(preflight, "write_marker", recorded)
    check_storage_writable(str(tmp_path / "run"), address_given=True)
    # one zero-CPU task per node, pinned to it: the CPU-less head ran its check too (a task asking for a CPU would
    # never start there, and this test would stop at the hang ceiling with the head's record missing)
    assert {p.name: p.read_text() for p in ran.iterdir()} == {n.node_id: n.node_id for n in alive_nodes()}
    assert list((tmp_path / "run").iterdir()) == []  # the markers and the token are gone


@pytest.mark.ray
def test_remote_uri_is_checked_on_every_node(cluster, tmp_path):
    # file:// is a pyarrow URI like s3:// or gs://: the remote branch, offline
    check_storage_writable(f"file://{tmp_path}/run", address_given=True)
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.ray
def test_a_node_that_cannot_write_is_named_in_one_line(cluster, tmp_path, every_node_answers):
    node = unwritable_node()
    run_dir = str(tmp_path / "run")
    with pytest.raises(UserError) as raised:
        verify_nodes(run_dir, alive_nodes(), simulate_failure_on=node["NodeID"])
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert f"node {node['NodeID']} ({node['NodeManagerAddress']}) cannot write to {run_dir}" in message
    assert "permission denied" in message and "shared storage (NFS, s3://, gs://)" in message
    assert sum(n.node_id in message for n in alive_nodes()) == 1  # only the failing node is named
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.ray
def test_a_node_that_has_gone_is_named(cluster, tmp_path):
    gone = preflight.Node("ab" * 28, "10.0.0.99")  # a node id no node has: its pinned task cannot run
    with pytest.raises(UserError, match=rf"node {gone.node_id} \(10\.0\.0\.99\) cannot write .*could not run there"):
        verify_nodes(str(tmp_path / "run"), [*alive_nodes(), gone])


@pytest.mark.ray
def test_a_run_directory_the_driver_cannot_write_fails_before_any_task(cluster, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="this machine cannot write to .*file/run: .*check the path"):
        check_storage_writable(str(tmp_path / "file" / "run"), address_given=True)


def test_hints_name_the_missing_setup():
    assert "IamInstanceProfile" in setup_hint("s3://bucket/runs")
    assert "service account" in setup_hint("gs://bucket/runs")
    assert "shared storage" in setup_hint("/home/ray/runs")

"""Cluster mode as Ray users run it, on a real two-node Ray on this machine: two `ray start` processes (a head and a
worker, one CPU each) with their own temp dir and ports, token authentication on and the token given to both, as
cluster.yaml starts them.

- the headline command: what `ray submit cluster.yaml search.py` runs on the head (Ray's own login-shell wrapper
  around `python ~/search.py`, after cluster.yaml's head set-up) runs its trials on both nodes;
- a search with neither `--address` nor `RAY_ADDRESS` stays on a private Ray and says, in one line, how to use the
  cluster; `--address local` wins over `RAY_ADDRESS`;
- `ray job submit --working-dir . -- python search.py …` runs the search on the cluster and writes its artifacts.

Where a trial ran is read from trials.parquet (each row's `node_id`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrator.artifacts.tables import PARETO_FILE, TRIALS_FILE, read_table
from tests.waiting import HANG_S, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
SMALL = ["--smoke-test", "--no-report", "--families", "quantization"]  # one fine-tuning epoch, 4-bit or 8-bit
MEETING = ["--workload", "tests.rendezvous_workload:make_workload"]  # the first two trials run at the same time
NODES = """
import ray
ray.init(address={address!r}, log_to_driver=False)
print(" ".join(sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])))
"""


@dataclass(frozen=True)
class LocalCluster:
    address: str  # the GCS, host:port
    dashboard: str  # the job server, http://host:port
    environ: dict[str, str]  # what every process of the cluster sees: the token's HOME, Ray's temp dir, PATH
    home: Path
    node_ids: frozenset[str]

    def nodes(self) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-c", NODES.format(address=self.address)],
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=HANG_S,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return set(done.stdout.split())


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _node_ports(ports: list[int]) -> list[str]:
    """A node's own ports, so that two nodes (and other Rays) on one machine never collide."""
    names = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc")
    names += ("runtime-env-agent", "metrics-export")
    return [f"--{name}-port={port}" for name, port in zip(names, ports, strict=True)]


def _start(args: list[str], environ: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start … --block` in its own process group: the node's processes are its children, stopped with it
    (never `ray stop`, which stops every Ray on the machine). What it prints goes to `log`."""
    with open(log, "ab") as output:
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--num-gpus=0", *args],
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _said(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):  # then it is killed below
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths live under it
    processes: list[subprocess.Popen] = []
    try:
        yield _start_cluster(root, processes)
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():  # a Ray process was still writing there as it stopped
            time.sleep(5)
            shutil.rmtree(root, ignore_errors=True)


def _start_cluster(root: Path, processes: list[subprocess.Popen]) -> LocalCluster:
    home = root / "home"
    home.mkdir()
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    environ |= {"HOME": str(home), "RAY_TMPDIR": str(root), "PATH": f"{BIN}:{environ.get('PATH', '')}"}
    # every node can import tests.rendezvous_workload, whose first two trials wait for each other there
    meeting = root / "rendezvous"
    meeting.mkdir()
    environ |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))}
    environ |= {"RENDEZVOUS_DIR": str(meeting)}
    # the token, made once as cluster.yaml's header asks (`ray get-auth-token --generate`): ~/.ray/auth_token
    made = subprocess.run([RAY, "get-auth-token", "--generate"], env=environ, capture_output=True, timeout=HANG_S)
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file()
    started = {**environ, "RAY_AUTH_MODE": "token"}  # as cluster.yaml's start commands set it on every node
    gcs, dashboard, client, *ports = free_ports(9)
    head_flags = ["--head", f"--port={gcs}", "--num-cpus=1", "--dashboard-host=127.0.0.1"]
    head_flags += [f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", *_node_ports(ports[:6])]
    processes.append(_start(head_flags, started, root / "head.log"))
    recorded = root / "ray" / "ray_current_cluster"
    wait_for(lambda: recorded.is_file() or processes[0].poll() is not None, "the head to start")
    assert processes[0].poll() is None, f"ray start --head failed: {_said(root / 'head.log')}"
    address = recorded.read_text().strip()  # as Ray names it (the node's address, for 127.0.0.1)
    assert address.endswith(f":{gcs}")
    found = LocalCluster(address, f"http://127.0.0.1:{dashboard}", started, home, frozenset())
    # The worker's ports were free when probed; a Ray that other tests start meanwhile may take one (`make test` runs
    # files side by side), so a worker that fails to start is started again on new ports, its output kept.
    for attempt in range(3):
        # its own temp dir, as a machine of its own has: nodes sharing one would share (and delete) job files
        flags = [f"--address={address}", "--num-cpus=1", f"--temp-dir={root / f'worker{attempt}'}"]
        log = root / f"worker{attempt}.log"
        processes.append(_start([*flags, *_node_ports(free_ports(6))], started, log))
        wait_for(lambda: len(found.nodes()) == 2 or processes[-1].poll() is not None, "the worker to join")
        if processes[-1].poll() is None:
            return LocalCluster(address, found.dashboard, started, home, frozenset(found.nodes()))
        print(f"ray start (the worker) failed, attempt {attempt + 1}: {_said(log)}", file=sys.stderr)
    raise AssertionError(f"ray start (the worker) failed three times: {_said(log)}")


def _run(command: list[str], environ: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=environ, cwd=cwd, capture_output=True, text=True, timeout=HANG_S)


def _nodes_used(run_dir: Path) -> set[str]:
    rows, _ = read_table(str(run_dir), TRIALS_FILE)
    assert rows and {r["status"] for r in rows} == {"completed"}, [(r["status"], r.get("error")) for r in rows]
    return {r["node_id"] for r in rows}


def _meeting_emptied(cluster: LocalCluster) -> None:
    """A new search's first two trials meet afresh (tests.rendezvous_workload)."""
    for arrival in Path(cluster.environ["RENDEZVOUS_DIR"]).iterdir():
        arrival.unlink()


def _console(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def test_the_headline_command_runs_its_trials_on_the_cluster(cluster, tmp_path):
    """cluster.yaml's head set-up, then `python ~/search.py …` as `ray submit` runs it (Ray's own wrapper): no
    --address, no RAY_ADDRESS in the caller's environment, and the trials run on both nodes."""
    from ray.autoscaler._private.command_runner import _with_interactive

    head_setup = yaml.safe_load((ROOT / "cluster.yaml").read_text())["head_setup_commands"]
    exports = [command for command in head_setup if "RAY_ADDRESS" in command]
    assert len(exports) == 1
    for _ in range(2):  # `ray up` runs it again on every update: still one line
        assert _run(["bash", "-c", exports[0]], cluster.environ).returncode == 0
    assert (cluster.home / ".bashrc").read_text().count("RAY_ADDRESS") == 1
    shutil.copy(ROOT / "search.py", cluster.home / "search.py")  # what `ray submit` copies: ~/search.py
    storage = tmp_path / "shared"
    script = f"{sys.executable} ~/search.py --storage-path {storage} --name headline --num-trials 3 --concurrency 2"
    command = _with_interactive(" ".join([script, *SMALL, *MEETING]))
    _meeting_emptied(cluster)
    environ = {k: v for k, v in cluster.environ.items() if k != "RAY_AUTH_MODE"}  # the .bashrc sets it
    done = _run(["bash", "-c", " ".join(command)], environ, cwd=cluster.home)
    assert done.returncode == 0, done.stderr[-4000:]
    where = _console(done.stderr, "trials run on:")
    assert where == [f"trials run on: cluster at {cluster.address} (RAY_ADDRESS=auto), 2 nodes, 2 CPUs, 0 GPUs"]
    assert not _console(done.stderr, "note: this search runs on a private")
    assert _nodes_used(storage / "headline") == cluster.node_ids  # both nodes ran trials


@pytest.mark.parametrize("how", ["nothing given", "--address local over RAY_ADDRESS"])
def test_a_search_not_told_to_join_stays_private(cluster, tmp_path, how):
    environ = dict(cluster.environ)
    flags = ["--storage-path", str(tmp_path), "--name", "private", "--num-trials", "1", *SMALL]
    if how != "nothing given":
        environ["RAY_ADDRESS"] = cluster.address
        flags += ["--address", "local"]
    done = _run([sys.executable, "search.py", *flags], environ)
    assert done.returncode == 0, done.stderr[-4000:]
    assert _console(done.stderr, "trials run on:") == ["trials run on: local private Ray, 2 CPUs"]
    notice = _console(done.stderr, "note: this search runs on a private local Ray")
    if how == "nothing given":  # the cluster `ray start` recorded on this machine answers: said, once
        assert notice == [
            f"note: this search runs on a private local Ray, not on the Ray cluster at {cluster.address} on this "
            "machine; to run its trials there, pass --address auto (or set RAY_ADDRESS=auto)"
        ]
    else:
        assert notice == []
    assert not _nodes_used(tmp_path / "private") & cluster.node_ids


def test_a_ray_job_runs_the_search_on_the_cluster(cluster, tmp_path):
    """`ray job submit --working-dir . -- python search.py …`: Ray Jobs hands the cluster over in RAY_ADDRESS."""
    storage = tmp_path / "shared"
    entrypoint = ["python", "search.py", "--storage-path", str(storage), "--name", "job"]
    entrypoint += ["--num-trials", "3", "--concurrency", "2", *SMALL, *MEETING]
    _meeting_emptied(cluster)
    done = _run(
        [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--", *entrypoint],
        cluster.environ,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    output = done.stdout + done.stderr
    assert f"trials run on: cluster at {cluster.address}" in output, output[-4000:]
    assert "succeeded" in output
    assert _nodes_used(storage / "job") == cluster.node_ids
    assert read_table(str(storage / "job"), PARETO_FILE)[0]
    assert (storage / "job" / "optuna-journal.log").is_file()

"""Before the first trial: can the search run where it was told to, and can every node write its results?

Before anything is created (`SearchConfig.check` calls these): the storage path is a directory this machine
can write (`check_storage_path`), `--address` names a Ray cluster that answers (`check_address`), and an
MLflow tracking URI is one MLflow reads and, for a server, answers (`check_tracking_uri`). Once Ray runs:
some node can hold one trial (`check_trial_fits`), and every node can write to the run directory.

A multi-node search whose workers cannot write (no S3 credentials, a local path that only the head has)
otherwise fails trial by trial, after the baseline is measured. `check_storage_writable` runs one tiny
task pinned to each alive node that reads a token the driver wrote (so the node sees the driver's files)
and writes and deletes a marker under `RUN/.preflight/`; the first node that cannot is one UserError line.
A single-node run on a local path starts nothing.

Nodes that join later (autoscaled workers: with a CPU-less head, every worker) are checked where it matters, in
the trial: Tune runs `run_checked_trial`, which has the node read the run's `run.json` and write a marker beside
it once per worker process before any work. A node that cannot raises `NodeCannotWrite`, one line naming it and
the fix; the driver's stopper (`stopping.StopOnFatalTrialError`) then stops the search instead of letting every
later trial there fail the same way.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orchestrator.errors import UserError
from orchestrator.files.fs import is_uri, join, read_bytes, resolve, write_atomic, write_problem
from orchestrator.search.config import SearchConfig

PREFLIGHT_DIR = ".preflight"
TOKEN_FILE = "token"
# Fault tests set this in a node's environment: that node's in-trial storage check fails as a denied write would.
SIMULATE_UNWRITABLE = "ORCHESTRATOR_SIMULATE_UNWRITABLE_STORAGE"
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
TIMEOUT_S = 60.0  # a node whose task has not run by then is reported on stderr, not failed
DRIVER_HINT = "check the path, its permissions, and this machine's credentials for that storage"
CONNECT_TIMEOUT_S = 5.0  # a Ray head or tracking server that is up accepts a TCP connection well within this
# MLflow tracking URI schemes (a database's may name its driver: postgresql+psycopg2://)
MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"  # one dot-separated part of a host name
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")


@dataclass(frozen=True)
class Node:
    """An alive Ray node: its id and IP address."""

    node_id: str
    ip: str


def check_storage_writable(run_dir: str, *, address_given: bool) -> None:
    """Raise UserError naming the first node that cannot write to `run_dir`; call it once Ray is started.

    Every alive node is checked when `run_dir` is remote (s3://, gs://) or Ray has more than one node. A
    local path on one node starts nothing (and, without `address_given` and no Ray running, asks nothing).
    """
    remote = is_uri(run_dir)
    if not remote and not address_given and not _ray_running():
        return
    nodes = alive_nodes() if _ray_running() else []
    if not remote and len(nodes) <= 1:
        return
    if not nodes:  # a remote run directory and no Ray: this process is the only writer
        try:
            failure = write_marker(run_dir, "driver", _write_token(run_dir))
        finally:
            _remove_preflight(run_dir)
        if failure:
            raise UserError(f"this machine cannot write to {run_dir}: {failure}; {DRIVER_HINT}")
        return
    verify_nodes(run_dir, nodes)


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def alive_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?")) for n in ray.nodes() if n.get("Alive")]


def verify_nodes(run_dir: str, nodes: list[Node], *, simulate_failure_on: str | None = None) -> None:
    """Run the write check on each node (pinned, no CPU asked); raise UserError for the first that fails.

    `simulate_failure_on` (a node id) is for tests only: that node's check fails as a denied write would.
    """
    try:
        failures = _run_pinned(run_dir, nodes, _write_token(run_dir), simulate_failure_on)
    finally:
        _remove_preflight(run_dir)
    for node in nodes:
        if node.node_id in failures:
            others = len(failures) - 1
            more = f" ({others} more node{'s' if others > 1 else ''} too)" if others else ""
            raise UserError(
                f"node {node.node_id} ({node.ip}) cannot write to {run_dir}: {failures[node.node_id]}{more}; "
                f"{setup_hint(run_dir)}"
            )


def _run_pinned(run_dir: str, nodes: list[Node], token: str, simulate_failure_on: str | None) -> dict[str, str]:
    """{node id: reason} for the nodes whose check failed; nodes that did not answer in time are noted."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(write_marker)
    refs = {
        task.options(
            name="storage-preflight",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote(  # type: ignore[call-arg]  # ray's typed .remote stubs take no keywords; the real one does
            run_dir, node.node_id, token, simulate_failure=node.node_id == simulate_failure_on
        ): node
        for node in nodes
    }
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=TIMEOUT_S)
    failures = {}
    for ref in ready:
        try:
            reason = ray.get(ref)
        except ray.exceptions.RayError as exc:
            reason = f"the check could not run there ({_first_line(exc)})"
        if reason:
            failures[refs[ref].node_id] = reason
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
        node = refs[ref]
        print(f"warning: node {node.node_id} ({node.ip}) did not run the storage check in time", file=sys.stderr)
    return failures


def write_marker(run_dir: str, node_id: str, token: str, *, simulate_failure: bool = False) -> str:
    """On one node: read the driver's token, write and delete `RUN/.preflight/<node_id>`; '' or why not."""
    where = join(run_dir, PREFLIGHT_DIR)
    try:
        seen = read_bytes(where, TOKEN_FILE)
        if seen is None or seen.decode(errors="replace") != token:
            return "it does not see the files the driver wrote there (not the same storage)"
        if simulate_failure:
            raise PermissionError(f"[simulated] permission denied: {join(where, node_id)}")
        filesystem, path = resolve(write_atomic(where, node_id, token.encode()))
        filesystem.delete_file(path)
    except Exception as exc:  # noqa: BLE001 - any storage error (OSError, ArrowException, botocore…) is the answer
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return ""


def check_search(config: SearchConfig) -> None:
    """Raise UserError for a search that cannot run, before anything is created or Ray starts: the values
    first, then the storage path, then whether the cluster and the tracking server answer."""
    config.check()
    check_storage_path(config.run.storage_path)
    check_address(config.resources.address)
    check_tracking_uri(config.run.mlflow)


class NodeCannotWrite(RuntimeError):
    """The node a trial runs on cannot write to the run directory (one line: the node, the reason, the fix)."""


_WRITTEN_FROM_HERE: set[str] = set()  # run directories this worker process has checked (a process is on one node)


def run_checked_trial(config: dict[str, Any], setup: Any) -> None:
    """Tune's trainable: the storage check of this node (once per worker process), then the trial itself."""
    from orchestrator.search.trial import run_trial

    check_this_node(setup.run_dir)
    run_trial(config, setup)


def check_this_node(run_dir: str) -> None:
    """Raise NodeCannotWrite unless the node this process runs on sees the run directory the driver wrote and
    can write to it (checked once per process)."""
    if run_dir in _WRITTEN_FROM_HERE:
        return
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    reason = node_problem(run_dir, node_id)
    if reason:
        ip = ray.util.get_node_ip_address()
        raise NodeCannotWrite(f"node {node_id} ({ip}) cannot write to {run_dir}: {reason}; {setup_hint(run_dir)}")
    _WRITTEN_FROM_HERE.add(run_dir)


def node_problem(run_dir: str, node_id: str) -> str:
    """'' when this process reads the run's run.json and writes (then deletes) a marker under `RUN/.preflight/`;
    else why not, in a few words."""
    from orchestrator.search.prepare import RUN_FILE

    try:
        if read_bytes(run_dir, RUN_FILE) is None:
            return f"it does not see the run's {RUN_FILE} there (not the same storage as the driver's)"
        marker = f"{node_id}-{uuid.uuid4().hex[:8]}"
        if os.environ.get(SIMULATE_UNWRITABLE):
            raise PermissionError(f"[simulated] permission denied: {join(join(run_dir, PREFLIGHT_DIR), marker)}")
        filesystem, path = resolve(write_atomic(join(run_dir, PREFLIGHT_DIR), marker, node_id.encode()))
        filesystem.delete_file(path)
    except Exception as exc:  # noqa: BLE001 - any storage error (OSError, ArrowException, botocore…) is the answer
        if NO_SPACE in str(exc):  # a full disk, not a node set up wrong: the search's full-disk handling says so
            raise
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return ""


def setup_hint(run_dir: str) -> str:
    """What to set up so that every node can write to `run_dir`."""
    if run_dir.startswith("s3://"):
        return (
            "give the workers an IAM instance profile with write access to the bucket "
            "(cluster.yaml: available_node_types.<type>.node_config.IamInstanceProfile)"
        )
    if run_dir.startswith("gs://"):
        return (
            "give the workers a service account with write access to the bucket "
            "(cluster.yaml: available_node_types.<type>.node_config.serviceAccounts)"
        )
    if is_uri(run_dir):
        return "give every node credentials that can write there"
    return "use shared storage (NFS, s3://, gs://) that every node mounts at the same path"


def _write_token(run_dir: str) -> str:
    token = uuid.uuid4().hex
    try:
        write_atomic(join(run_dir, PREFLIGHT_DIR), TOKEN_FILE, token.encode())
    except Exception as exc:  # noqa: BLE001 - the driver's own storage error, as one line
        raise UserError(
            f"this machine cannot write to {run_dir}: {type(exc).__name__}: {_first_line(exc)}; {DRIVER_HINT}"
        ) from None
    return token


def _remove_preflight(run_dir: str) -> None:
    try:
        filesystem, path = resolve(join(run_dir, PREFLIGHT_DIR))
        filesystem.delete_dir(path)
    except Exception:  # noqa: BLE001 - best effort: a leftover marker directory harms nothing
        pass


def _first_line(exc: Any) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_storage_path(storage: str) -> None:
    """Raise UserError when the local `--storage-path` is not a directory this machine can write (URIs are
    checked once Ray runs, by `check_storage_writable`)."""
    problem = "" if is_uri(storage) else write_problem(storage)
    if problem:
        raise UserError(f"--storage-path {storage}: {problem}; give a directory this machine can write to")


def parse_address(address: str, flag: str = "--address") -> tuple[str, int]:
    """(host, port) of `[ray://]host:port` (an IPv6 host in brackets); UserError naming `flag` when malformed."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    valid_host = _valid_host(host) and (bracketed or ":" not in host)  # IPv6 only in brackets, as Ray reads it
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535 or not valid_host:
        raise UserError(
            f"{flag} {address!r} is not HOST:PORT with a valid host and a port from 1 to 65535 (e.g. 10.0.0.5:6379 "
            "or ray://10.0.0.5:10001); 'auto' joins the cluster this node belongs to"
        )
    return host, int(port)


def _valid_host(host: str) -> bool:
    """An IP address, or a host name that is not a malformed dotted quad (256.1.1.1)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_NAME.fullmatch(host)) and not re.fullmatch(r"[\d.]+", host)


def check_address(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S, *, flag: str = "--address") -> None:
    """Raise UserError unless `address` can be joined: None and 'local' (a private Ray) pass; 'auto' checks
    RAY_ADDRESS when set (else Ray looks for a cluster on this node, and says at once when there is none);
    `[ray://]host:port` must accept a TCP connection within `timeout_s` (Ray itself retries for minutes)."""
    if address in (None, "local"):
        return
    if address == "auto":
        from_environment = os.environ.get("RAY_ADDRESS", "")
        if from_environment not in ("", "auto", "local"):
            check_address(from_environment, timeout_s, flag="RAY_ADDRESS")
        return
    host, port = parse_address(address, flag)
    problem = connect_problem(host, port, timeout_s)
    if problem:
        service = "Ray client server" if address.startswith("ray://") else "Ray head (GCS)"
        raise UserError(
            f"{flag} {address}: {problem}; start the cluster (ray start --head) or fix the address, "
            f"and open port {port} of the {service} to this machine"
        )


def connect_problem(host: str, port: int, timeout_s: float) -> str:
    """'' when host:port accepts a TCP connection within `timeout_s`, else why not, in a few words."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except socket.gaierror:
        return f"cannot resolve {host}"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return (exc.strerror or type(exc).__name__).lower()
    return ""


def check_tracking_uri(uri: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise UserError for an `--mlflow` URI that cannot work: an unknown scheme, a server that does not accept a
    connection within `timeout_s`, a local store this machine cannot write. None (no MLflow) and '' (mlruns/
    beside the run directory, checked with the storage path) pass."""
    if not uri:
        return
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    if scheme and scheme not in MLFLOW_SCHEMES:
        raise UserError(
            f"--mlflow {uri}: MLflow does not read {parts.scheme}:// URIs; give http(s)://HOST:PORT, a directory, "
            f"or a {', '.join(s for s in MLFLOW_SCHEMES if s not in ('http', 'https'))} URI"
        )
    if scheme in ("http", "https"):
        try:
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError:  # a port that is not a number from 0 to 65535
            host = None
        problem = connect_problem(host, port, timeout_s) if host else "no HOST:PORT in it"
        if problem:
            raise UserError(f"--mlflow {uri}: {problem}; start the tracking server (mlflow server) or fix the URI")
    elif scheme in ("", "file"):
        problem = write_problem(parts.path if scheme else uri)
        if problem:
            raise UserError(f"--mlflow {uri}: {problem}; give a directory this machine can write to")


LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # where the cluster launcher leaves its config on a head node


def check_trial_fits(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Raise UserError when no node of the running Ray cluster, nor any node type its autoscaler may start, has
    the CPUs and GPUs one trial asks for: Tune would wait forever, saying so only in its log.

    Node types are known from an autoscaler that publishes them (v2, KubeRay); a cluster started by the cluster
    launcher (its bootstrap config on this head node, as Tune itself tests) is trusted to add what it can."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if _fits(nodes, cpus_per_trial, gpus_per_trial) or _fits(_node_types(), cpus_per_trial, gpus_per_trial):
        return
    if Path(LAUNCHER_CONFIG).expanduser().exists():
        return
    total = ray.cluster_resources()
    most = {key: max((n.get(key, 0) for n in nodes), default=0) for key in ("CPU", "GPU")}
    raise UserError(
        f"a trial asks for {cpus_per_trial:g} CPUs and {gpus_per_trial:g} GPUs (--cpus-per-trial, --gpus-per-trial), "
        f"but no node of the Ray cluster has them: {len(nodes)} node{'s' if len(nodes) != 1 else ''} with "
        f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs in all, at most {most['CPU']:g} CPUs and "
        f"{most['GPU']:g} GPUs on one; ask for less per trial, or add a node that has them"
    )


def _fits(nodes: list[dict[str, float]], cpus: float, gpus: float) -> bool:
    return any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus for node in nodes)


def _node_types() -> list[dict[str, float]]:
    """The resources of each node type the autoscaler may still start, when it publishes them (else [])."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API that may move: then no node types are known
        return []
    groups = config.node_group_configs if config is not None else []
    return [dict(group.resources) for group in groups if group.max_count != 0]

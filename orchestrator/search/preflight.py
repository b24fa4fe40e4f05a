"""Before the first trial: can every node of the cluster write to the run directory?

A multi-node search whose workers cannot write (no S3 credentials, a local path that only the head has)
otherwise fails trial by trial, after the baseline is measured. `check_storage_writable` runs one tiny
task pinned to each alive node that reads a token the driver wrote (so the node sees the driver's files)
and writes and deletes a marker under `RUN/.preflight/`; the first node that cannot is one UserError line.
A single-node run on a local path starts nothing.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from orchestrator.artifacts.fs import is_uri, join, read_bytes, resolve, write_atomic
from orchestrator.errors import UserError

PREFLIGHT_DIR = ".preflight"
TOKEN_FILE = "token"
TIMEOUT_S = 60.0  # a node whose task has not run by then is reported on stderr, not failed
DRIVER_HINT = "check the path, its permissions, and this machine's credentials for that storage"


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
        ).remote(run_dir, node.node_id, token, simulate_failure=node.node_id == simulate_failure_on): node
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

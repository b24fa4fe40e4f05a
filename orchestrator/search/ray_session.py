"""Where a search's trials run: a private local Ray, or the Ray cluster that `--address` or `RAY_ADDRESS` names.

Decisions:
- Ray's own convention decides, as `ray.init`, `ray job submit` and KubeRay's RayJobs follow it: `--address`
  wins; else `RAY_ADDRESS` when it is set; `local`, either way, forces a private Ray. Ray Jobs and KubeRay hand
  the cluster to an entrypoint through `RAY_ADDRESS`, and the head of `cluster.yaml` exports `RAY_ADDRESS=auto`
  for what `ray submit` and `ray exec` run, so the headline command uses the cluster as written.
- With neither, the search starts a private Ray in-process (`address="local"`, its own temp dir, no dashboard):
  it never joins a cluster by accident. When `ray.init()` would have joined one (the cluster `ray start` last
  recorded on this machine, and it answers), one line says so and how to use it.
- Once Ray runs, one line always says where the trials run (`local private Ray, N CPUs` or `cluster at
  ADDRESS, N nodes, N CPUs, N GPUs`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError
from orchestrator.search.config import Resources
from orchestrator.search.preflight import connect_problem, parse_address

ADDRESS_VARIABLE = "RAY_ADDRESS"
AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
NOTICE_TIMEOUT_S = 1.0  # a cluster on this machine that is up accepts a connection at once
_STARTED_HERE: set[str] = set()  # GCS addresses of the private Rays this process started
TOKEN_HINT = (
    "this cluster uses token authentication: give this process its token (~/.ray/auth_token, RAY_AUTH_TOKEN or "
    "RAY_AUTH_TOKEN_PATH) with RAY_AUTH_MODE=token; `ray get-auth-token` on the head prints it"
)


@dataclass(frozen=True)
class RayTarget:
    """Where the search's Ray is: a cluster address (as given: `auto`, `host:port`, `ray://…`) or None for a
    private local Ray, and what said so (`--address`, `RAY_ADDRESS`, or '' for the default)."""

    address: str | None
    source: str = ""

    @property
    def private(self) -> bool:
        return self.address is None


def ray_target(address: str | None, environ: Mapping[str, str] | None = None) -> RayTarget:
    """Where a search with `--address address` runs, as Ray's own tools decide it (see the module's decisions)."""
    environ = os.environ if environ is None else environ
    if address:
        return RayTarget(None if address == "local" else address, "--address")
    from_environment = environ.get(ADDRESS_VARIABLE, "").strip()
    if from_environment:
        return RayTarget(None if from_environment == "local" else from_environment, ADDRESS_VARIABLE)
    return RayTarget(None)


def start_ray(resources: Resources, *, log_file: Path | None = None) -> RayTarget:
    """Join the cluster `resources.address` or RAY_ADDRESS names, or start a private local Ray (saying so in one line
    when a cluster runs on this machine); Ray's own log lines, those it writes while starting included, go to
    `log_file` when one is given. Returns where the trials run."""
    import ray

    target = ray_target(resources.address)
    if not ray.is_initialized():
        if target.private and not target.source:
            notice = cluster_notice()
            if notice:
                print(notice, file=sys.stderr, flush=True)
        with _to_log(log_file):
            _init_ray(resources, target, log_file is None)
    if log_file is not None:
        route_ray_logs(log_file)
    return target


def _init_ray(resources: Resources, target: RayTarget, configure_logging: bool) -> None:
    import ray

    if target.address is not None:
        try:
            ray.init(
                address=target.address,
                **{**_quiet_driver(target.address, configure_logging), **resources.extra_ray_init},
            )
        except ray.exceptions.AuthenticationError:
            raise UserError(f"{target.source} {target.address}: {TOKEN_HINT}") from None
        except ConnectionError as exc:  # a head that answers but refuses this process: usually a missing token
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            asks = target.address != "auto" and os.environ.get(AUTH_MODE_VARIABLE) != "token"
            token = f"if {TOKEN_HINT}; else " if asks else ""
            raise UserError(
                f"{target.source} {target.address}: {reason.rstrip('.')}; {token}start the cluster (ray start "
                "--head), fix the address, or run privately with --address local"
            ) from None
        return
    ray.init(
        address="local",
        _temp_dir=tempfile.mkdtemp(prefix="ray-"),
        dashboard_host="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=configure_logging,
        logging_level="WARNING",  # type: ignore[arg-type]  # ray annotates int; its own default is "info"
        **resources.extra_ray_init,
    )
    _STARTED_HERE.add(ray.get_runtime_context().gcs_address)


def _quiet_driver(address: str, configure_logging: bool) -> dict[str, Any]:
    """What keeps a driver that joins a cluster as quiet as a private one: the trials' output stays in Ray's logs
    and Ray's own lines go to the search's log (a Ray Client connection, ray://, is left as Ray sets it up)."""
    if address.startswith("ray://"):
        return {}
    return {"log_to_driver": False, "configure_logging": configure_logging, "logging_level": "WARNING"}


def local_cluster(timeout_s: float = NOTICE_TIMEOUT_S) -> str | None:
    """The address of the cluster a bare `ray.init()` would join on this machine (the one `ray start` last
    recorded in Ray's temp dir), when it accepts a connection; else None."""
    try:
        address = _ray_address_file().read_text().strip()
        host, port = parse_address(address)
    except Exception:  # noqa: BLE001 - no record or an unreadable one: no notice
        return None
    return None if connect_problem(host, port, timeout_s) else address


def _ray_address_file() -> Path:
    """Where `ray start` records the cluster's address: `<temp>/ray/ray_current_cluster`, the temp directory being
    RAY_TMPDIR, else TMPDIR, else /tmp (Ray 2.60's `ray._common.utils.get_ray_address_file`, read without importing
    Ray's private modules)."""
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(temp) / "ray" / "ray_current_cluster"


def cluster_notice() -> str:
    """One line when a Ray cluster runs on this machine that a private search leaves alone ('' otherwise)."""
    address = local_cluster()
    if address is None:
        return ""
    return (
        f"note: this search runs on a private local Ray, not on the Ray cluster at {address} on this machine; "
        f"to run its trials there, pass --address auto (or set RAY_ADDRESS=auto)"
    )


def where_trials_run(target: RayTarget) -> str:
    """One line: where the trials run, and what that Ray holds now (call it once Ray runs)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if target.private and _started_here():
        return f"trials run on: local private Ray, {_count(cpus, 'CPU')}" + (f", {_count(gpus, 'GPU')}" if gpus else "")
    address = _gcs_address() or target.address or "?"
    given = f" ({target.source}={target.address})" if target.source and target.address != address else ""
    scales = "; the autoscaler adds nodes as trials wait" if autoscaled() else ""
    return (
        f"trials run on: cluster at {address}{given}, {_count(len(nodes), 'node')}, {_count(cpus, 'CPU')}, "
        f"{_count(gpus, 'GPU')}{scales}"
    )


def autoscaled() -> bool:
    """Whether the cluster may add nodes: its autoscaler publishes node types (v2, KubeRay), or this is a head the
    cluster launcher started (its bootstrap config is here)."""
    from orchestrator.search.preflight import LAUNCHER_CONFIG, _node_types

    return Path(LAUNCHER_CONFIG).expanduser().exists() or bool(_node_types())


def _count(value: float, unit: str) -> str:
    return f"{value:g} {unit}{'' if value == 1 else 's'}"


def _gcs_address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a Ray Client connection (ray://) does not know it
        return None


def _started_here() -> bool:
    """Whether this process started the Ray it is connected to (a private one) rather than joining one."""
    return _gcs_address() in _STARTED_HERE


class _LogFileHandler(logging.FileHandler):
    """A log file that drops a line it cannot write (a full disk) instead of printing a traceback to the console:
    the search itself reports the full disk in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        return None


def route_ray_logs(log_file: Path) -> None:
    """Send the `ray` loggers (Ray, Tune, and their warnings) to `log_file` instead of the console."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("ray")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextlib.contextmanager
def _to_log(log_file: Path | None) -> Iterator[None]:
    """Python-level stderr into the log while Ray starts (it clears its loggers' handlers as it does)."""
    if log_file is None:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log, contextlib.redirect_stderr(log):
        yield

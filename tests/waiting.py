"""Waiting in tests is bounded by events; the one clock here only stops a hung test, it never judges speed."""

from __future__ import annotations

import time
from collections.abc import Callable

# Far longer than any healthy step takes, even on two cores shared with other jobs: reaching it means hung.
HANG_S = 1800.0


def wait_for(done: Callable[[], bool], what: str, *, poll_s: float = 0.1) -> None:
    """Poll `done` until it holds; fail naming `what` if it still does not after HANG_S."""
    give_up = time.monotonic() + HANG_S
    while not done():
        if time.monotonic() > give_up:
            raise AssertionError(f"still waiting for {what} after {HANG_S:.0f} s: hung")
        time.sleep(poll_s)


def simulated_cluster(*workers: dict):  # noqa: ANN201 - a ray.cluster_utils.Cluster
    """A CPU-less head and one node per `workers` entry (add_node arguments) on this machine, ready when every node
    has registered (not within Ray's default 30 s, which a loaded machine can miss)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "wait": False})
    for args in workers:
        cluster.add_node(wait=False, **args)
    cluster.wait_for_nodes(timeout=HANG_S)
    return cluster

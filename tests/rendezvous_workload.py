"""digits, except that a search's first two trials wait for each other: they must run at the same time, so on a
cluster of two one-CPU nodes they run on both (the cluster-mode tests assert that without racing the scheduler).

The nodes are started with this repository on PYTHONPATH and RENDEZVOUS_DIR set; each trial (a Ray actor) marks
its arrival there on its first evaluation and waits until two have arrived. The driver's own evaluations (no
actor) never wait. A trial waits at most HANG_S, then goes on (the test then fails on its node assertion).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.workloads import Workload, resolve_workload
from tests.waiting import HANG_S

ARRIVALS = 2


def _in_a_trial() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _meet() -> None:
    """Mark this trial's arrival (once per process) and wait for the second one."""
    meeting = Path(os.environ["RENDEZVOUS_DIR"])
    (meeting / str(os.getpid())).touch()
    deadline = time.monotonic() + HANG_S
    while len(list(meeting.iterdir())) < ARRIVALS and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclass(frozen=True)
class RendezvousWorkload(Workload):
    def evaluate(self, model, split="validation", device=None):  # noqa: ANN001, ANN201
        if _in_a_trial():
            _meet()
        return super().evaluate(model, split, device)


def make_workload() -> RendezvousWorkload:
    digits = resolve_workload("digits")
    return RendezvousWorkload(**{f.name: getattr(digits, f.name) for f in dataclasses.fields(Workload) if f.init})

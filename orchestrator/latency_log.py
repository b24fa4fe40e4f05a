"""How fast this machine has run a baseline, across runs: every time the baseline is timed (a search's reference,
beside each trial's model, collect's re-timing, `evaluate`), its median latency is appended to a small log in
the tool's cache, so a search's recorded spread can be widened by every speed the machine has shown, not only
the ones seen during that run (`measure.drift_widened`).

Decisions: a log is keyed by the baseline's weights (a digest, so a retrained baseline starts a new one), the
deployment target, batch size, threads, device and the machine (host name, CPU model, core count); it is JSON
(`{"baseline": ..., "samples": [[unix time, ms], ...]}`), the newest MAX_SAMPLES kept, rewritten atomically
under a lock because a search's trials append at once. The log is a measurement aid, never a reason to fail:
an unreadable log reads as empty and a failed write is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from orchestrator.artifacts.fs import cache_root, directory_lock, write_atomic
from orchestrator.digest import model_fingerprint

MAX_SAMPLES = 2000


def log_dir() -> Path:
    """Where the logs are kept: `latency/` in the tool's cache."""
    return cache_root() / "latency"


def machine() -> dict[str, Any]:
    """What identifies this machine's speed: host name, CPU model and core count."""
    model = platform.processor()
    try:
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else model
    except OSError:
        pass
    return {"host": platform.node(), "cpu": model, "cores": os.cpu_count()}


def describe(baseline: nn.Module, *, target: str, batch_size: int, threads: int, device: str) -> dict[str, Any]:
    """What a log is of: this baseline (its weights' digest), timed this way, on this machine."""
    return {
        "weights": model_fingerprint(baseline),
        "target": target,
        "batch_size": batch_size,
        "threads": threads,
        "device": device,
        "machine": machine(),
    }


def key_of(description: dict[str, Any]) -> str:
    """The log's file stem: a digest of its description."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _samples(key: str) -> list[tuple[float, float]]:
    """The log's (unix time, ms) pairs; none when it is missing or unreadable."""
    try:
        record = json.loads((log_dir() / f"{key}.json").read_text())
        return [(float(t), float(ms)) for t, ms in record["samples"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def append(description: dict[str, Any], latencies_ms: Iterable[Any], *, at: float | None = None) -> None:
    """Add latencies timed now (or `at`) to the log of `description`; skipped when the cache cannot be
    written."""
    stamp = time.time() if at is None else at
    new = [[stamp, float(ms)] for ms in latencies_ms if isinstance(ms, int | float) and math.isfinite(ms) and ms > 0]
    if not new:
        return
    key = key_of(description)
    try:
        with directory_lock(str(log_dir()), wait=True):
            samples = [list(sample) for sample in _samples(key)] + new
            record = {"baseline": description, "samples": samples[-MAX_SAMPLES:]}
            write_atomic(str(log_dir()), f"{key}.json", json.dumps(record).encode())
    except OSError:
        return


def observed(description: dict[str, Any], *, before: float | None = None) -> list[float]:
    """The latencies in the log of `description` (those timed before `before`, when given)."""
    return [ms for t, ms in _samples(key_of(description)) if before is None or t < before]

"""How fast this machine has run a baseline, across runs: every time the baseline is timed (a search's reference,
beside each trial's model, collect's re-timing, `evaluate`), its median latency is appended to a small log in
the tool's cache, so a search's recorded spread can be widened by every speed the machine has shown, not only
the ones seen during that run (`timing.drift_widened`).

Decisions: a log is keyed by the baseline's weights (a digest, so a retrained baseline starts a new one), the
deployment target, batch size, threads, device and the machine (host name, CPU model, core count); it is JSON
(`{"baseline": ..., "samples": [[unix time, ms], ...]}`), the newest MAX_SAMPLES kept, rewritten atomically
under a lock because a search's trials append at once. The log is a measurement aid, never a reason to fail:
an unreadable log reads as empty and a failed write is skipped.

The log is input (anyone who can write the cache can edit it) and it widens the spreads a search reports, so it is
believed only when it is plausible: at most MAX_LOG_BYTES, strict JSON, every sample a finite positive pair with
its latency in PLAUSIBLE_MS, the slowest at most SPREAD times the fastest, and, when read beside a fresh timing of
the baseline, every one within NEAR times of it. A log that fails is ignored (said once on stderr) and replaced by
the next append.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from orchestrator.errors import UserError
from orchestrator.files.digest import model_fingerprint
from orchestrator.files.fs import cache_root, directory_lock, write_atomic
from orchestrator.files.jsondoc import parse_json

MAX_SAMPLES = 2000
MAX_LOG_BYTES = 1 << 20  # a full log is ~100 KB; a larger one is not read at all
PLAUSIBLE_MS = (1e-6, 1e7)  # one nanosecond to nearly three hours per timed call
SPREAD = 1000.0  # the slowest sample of a log over its fastest, at most
NEAR = 10.0  # read beside a fresh timing: no sample further than this factor from it
_NOTED: set[str] = set()


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


def _note(path: Path, reason: str) -> None:
    """Say once per log and process that it is ignored."""
    if str(path) not in _NOTED:
        _NOTED.add(str(path))
        print(f"note: ignoring the latency log {path}: {reason}", file=sys.stderr, flush=True)


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None (bools, strings, NaN and integers past float's range are not latencies)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def checked_samples(record: Any) -> list[tuple[float, float]]:
    """The (unix time, ms) pairs of a parsed log, if every one is plausible; ValueError saying why not."""
    samples = record.get("samples") if isinstance(record, dict) else None
    if not isinstance(samples, list):
        raise ValueError("it has no list of samples")
    pairs = []
    for sample in samples:
        pair = [_number(v) for v in sample] if isinstance(sample, list) else []
        if len(pair) != 2 or pair[0] is None or pair[1] is None or pair[0] <= 0:
            raise ValueError(f"{str(sample)[:40]} is not a [unix time, ms] pair")
        if not PLAUSIBLE_MS[0] <= pair[1] <= PLAUSIBLE_MS[1]:
            raise ValueError(f"a latency of {pair[1]} ms is outside {PLAUSIBLE_MS}")
        pairs.append((pair[0], pair[1]))
    _check_within([ms for _, ms in pairs], min((ms for _, ms in pairs), default=0.0), SPREAD)
    return pairs


def _check_within(latencies: list[float], low: float, factor: float) -> None:
    """Every latency lies in [low, low × factor] (ValueError if not)."""
    outside = [ms for ms in latencies if not low <= ms <= low * factor]
    if outside:
        raise ValueError(f"{outside[0]} ms is not within {factor:g}x of {low:.4g} ms")


def _samples(key: str) -> list[tuple[float, float]]:
    """The log's (unix time, ms) pairs; none when it is missing, unreadable or implausible."""
    path = log_dir() / f"{key}.json"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_LOG_BYTES + 1)
        if len(data) > MAX_LOG_BYTES:
            raise ValueError(f"it is larger than {MAX_LOG_BYTES} bytes")
        return checked_samples(parse_json(data, "it"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, UserError) as exc:
        _note(path, str(exc))
        return []


def append(description: dict[str, Any], latencies_ms: Iterable[Any], *, at: float | None = None) -> None:
    """Add latencies timed now (or `at`) to the log of `description`; skipped when the cache cannot be
    written."""
    stamp = time.time() if at is None else at
    timed = [_number(ms) for ms in latencies_ms]
    new = [[stamp, ms] for ms in timed if ms is not None and PLAUSIBLE_MS[0] <= ms <= PLAUSIBLE_MS[1]]
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


def observed(description: dict[str, Any], *, before: float | None = None, near: float | None = None) -> list[float]:
    """The latencies in the log of `description` (those timed before `before`, when given); with `near` (the
    baseline's latency timed now), none when any is further than NEAR times from it (said once on stderr)."""
    found = [ms for t, ms in _samples(key_of(description)) if before is None or t < before]
    if near is not None and found:
        try:
            _check_within(found, near / NEAR, NEAR * NEAR)
        except ValueError as exc:
            _note(log_dir() / f"{key_of(description)}.json", f"{exc}, beside {near:.4g} ms timed now")
            return []
    return found

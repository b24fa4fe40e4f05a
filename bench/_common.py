"""What the search benchmarks share: environment facts, one in-process Ray, searches in a scratch directory,
the hypervolume they are compared on, per-trial timelines from Tune's result files, tables and JSON.

Imported by the scripts in this package (`python -m bench.NAME` from the repository root).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.artifacts.store import package_versions
from orchestrator.pareto import hypervolume, pareto_front

PACKAGES = ("ray", "optuna", "numpy", "scikit-learn")
DIRECTIONS = ("maximize", "minimize")  # validation accuracy, log10 bytes
HV_UNIT = "accuracy × decades of compression"
NEAR = 0.05  # the second hypervolume counts only models within 5 points of the baseline's validation accuracy


def command_line(bench: str, argv: Sequence[str] | None) -> str:
    """The command as a user types it (`python -m bench.NAME ARGS`)."""
    return shlex.join(["python", "-m", f"bench.{bench}", *(sys.argv[1:] if argv is None else argv)])


def machine() -> dict[str, Any]:
    """CPU model name (as `lscpu` shows it), core count and platform."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def environment(command: str, seeds: Sequence[int]) -> dict[str, Any]:
    """Command, date, machine, package versions, torch threads, seeds and the load average right now."""
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "gpus": torch.cuda.device_count(), "python": platform.python_version()},
        "versions": {**package_versions(), **{name: metadata.version(name) for name in PACKAGES}},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": list(seeds)[0],
        "seeds": list(seeds),
        "load_average_start": list(os.getloadavg()),
    }


def header_line(report: dict[str, Any]) -> str:
    """One line of environment facts printed above a table."""
    m = report["machine"]
    v = report["versions"]
    return (
        f"{report['date']}  {m['cpu']} ({m['cores']} cores, {m['gpus']} GPUs)  torch {report['torch']}  "
        f"ray {v.get('ray')}  optuna {v.get('optuna')}  seeds {report['seeds']}  "
        f"load {report['load_average_start'][0]:.2f} -> {report['load_average_end'][0]:.2f}"
    )


def default_out(path: str, quick: bool) -> Path:
    """Where the JSON goes: `path` for a full run; the temp dir for --quick, so it never replaces real numbers."""
    return Path(tempfile.gettempdir()) / Path(path).name.replace(".json", "-quick.json") if quick else Path(path)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Finish the report (load average at the end) and write it."""
    report["load_average_end"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """One in-process Ray for every search of a benchmark (restarting it per search costs seconds)."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def scratch() -> Iterator[str]:
    """A temporary storage path for search runs (checkpoints and journals are not kept)."""
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        yield tmp


# --------------------------------------------------------------------------- fronts


def hv_points(rows: Iterable[dict[str, Any]]) -> np.ndarray:
    """(validation, log10 bytes) of the rows, one per line."""
    return np.array([[r["validation"], math.log10(r["size_bytes"])] for r in rows], dtype=float).reshape(-1, 2)


def front_hypervolume(rows: Sequence[dict[str, Any]], baseline_bytes: int, min_accuracy: float = 0.0) -> float:
    """Area dominated in (validation accuracy ↑, log10 bytes ↓) up to (min_accuracy, log10 baseline bytes).

    In units of accuracy × decades of compression: a model at accuracy a and c× smaller than the baseline
    alone dominates (a − min_accuracy) × log10(c). Models bigger than the baseline or below min_accuracy add 0.
    """
    if not rows:
        return 0.0
    return hypervolume(hv_points(rows), DIRECTIONS, [min_accuracy, math.log10(baseline_bytes)])


HV_REFERENCE = {
    "hv": "(validation accuracy 0, log10 baseline bytes)",
    "hv_near": f"(baseline validation accuracy - {NEAR}, log10 baseline bytes)",
}


def hypervolumes(rows: Sequence[dict[str, Any]], baseline: dict[str, Any]) -> dict[str, float]:
    """`hv` (reference accuracy 0) and `hv_near` (reference accuracy NEAR below the baseline's)."""
    return {
        "hv": front_hypervolume(rows, baseline["size_bytes"]),
        "hv_near": front_hypervolume(rows, baseline["size_bytes"], baseline["validation"] - NEAR),
    }


def front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows on the (validation ↑, bytes ↓) Pareto front, smallest first."""
    if not rows:
        return []
    picked = [rows[i] for i in pareto_front(hv_points(rows), DIRECTIONS)]
    return sorted(picked, key=lambda r: (r["size_bytes"], -r["validation"]))


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """`mean ± std` (sample std; just the value for one sample)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- trial timelines


@dataclass(frozen=True)
class TrialTimes:
    """When a trial ran (driver clock, seconds) and how many fine-tuning epochs it actually ran."""

    trial_id: str
    start: float
    end: float
    epochs: int
    final: bool


def trial_times(run_dir: str) -> dict[str, TrialTimes]:
    """Per trial, from `trial_*/`: how long it ran is Tune's `time_total_s` of its last report; when it ended is
    the write time of its checkpoint (made by the final report) or, for a trial stopped before that, the
    interval the reports' whole-second `timestamp`s leave; epochs = the largest `epoch` it reported.

    (result.json itself is no clock: Tune stages it and copies it into the run directory at the end.)
    """
    times = {}
    for path in Path(run_dir).glob("trial_*/result.json"):
        results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not results:
            continue
        last = results[-1]
        total = float(last["time_total_s"])
        checkpoints = sorted(path.parent.glob("checkpoint_*"))
        if checkpoints:
            start = checkpoints[-1].stat().st_mtime - total
        else:  # each report says int(now) = floor(start + its time_total_s): intersect those intervals
            offsets = [r["timestamp"] - float(r["time_total_s"]) for r in results]
            start = (max(offsets) + min(offsets) + 1) / 2
        times[last["trial_id"]] = TrialTimes(
            trial_id=last["trial_id"],
            start=start,
            end=start + total,
            epochs=max(int(r.get("epoch", 0)) for r in results),
            final=any(r.get("final") for r in results),
        )
    return times


def concurrency(times: Iterable[TrialTimes]) -> dict[str, float]:
    """Mean concurrency (trial-seconds / span of the trials) and the most trials running at one instant."""
    spans = sorted((t.start, t.end) for t in times)
    if not spans:
        return {"mean": 0.0, "max": 0}
    busy = sum(end - start for start, end in spans)
    span = max(end for _, end in spans) - spans[0][0]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda ev: (ev[0], ev[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return {"mean": busy / span if span > 0 else 1.0, "max": peak}


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG (creating its folder) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

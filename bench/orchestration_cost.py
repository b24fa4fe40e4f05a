"""Orchestration cost: what Ray Tune + Optuna + checkpointing add to the bare trial work, and throughput.

    python -m bench.orchestration_cost [--quick] [--trials N] [--gpus-per-trial G]

Random search over the default digits space, so every run below evaluates the very same policies (the
sampler's draws do not depend on completion order; the JSON records that the policy sets are equal):
1. search, 1 trial at a time, on a local 2-CPU Ray;
2. search, 2 trials at a time, same Ray;
3. search, 2 trials at a time, on a simulated cluster (`ray.cluster_utils.Cluster`: a head with 0 CPUs and
   2 worker nodes of 1 CPU each), so the head runs no trial and the two trials must run on two nodes;
4. the bare trial work: the same policies through `executor.apply` (apply + fine-tune + measurement) in a
   plain loop in this process, with one torch and one BLAS/OpenMP thread as a one-CPU Ray trial has (Ray
   sets OMP_NUM_THREADS=1 in its workers), baseline loaded and measured once beforehand. It runs twice,
   right after run 1 and after run 3, and its time is the mean of the two passes (the machine is shared).
Overhead = search wall time per trial at 1 concurrent ÷ bare time per policy. Measured concurrency comes
from each trial's start/end (`_common.trial_times`). Ray start-up is timed apart and excluded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import _common
from orchestrator import executor
from orchestrator.artifacts.tables import TrialRow
from orchestrator.measure import measure_reference
from orchestrator.policy import Policy
from orchestrator.search import SearchConfig, run
from orchestrator.search.space_options import options_from_json
from orchestrator.workloads import resolve_workload

DEFAULT_OUT = "docs/bench/orchestration_cost.json"
SEED = 0
TRIALS = 32
QUICK = {"trials": 4, "space": {"distillation": {"epochs": [1]}}}


@dataclass(frozen=True)
class Settings:
    trials: int
    gpus_per_trial: float
    space: dict[str, Any]


def search(settings: Settings, storage: str, name: str, concurrency: int, address: str | None = None) -> dict:
    """One random search; its wall time, trials (policy, node, wall_s) and measured concurrency."""
    config = SearchConfig(
        max_accuracy_drop=None,  # as measured with 0.1: no accuracy guard (see docs/BENCHMARKS.md)
        num_trials=settings.trials,
        sampler="random",
        seed=SEED,
        concurrency=concurrency,
        gpus_per_trial=settings.gpus_per_trial,
        storage_path=storage,
        name=name,
        report=False,
        address=address,
        space=options_from_json(settings.space),
    )
    print(f"search {name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    outcome = run(config)
    wall = time.perf_counter() - started
    times = _common.trial_times(outcome.run_dir)
    trials = [
        {
            "trial_id": t["trial_id"],
            "status": t["status"],
            "node_id": t["node_id"],
            "wall_s": t["wall_s"],
            "start": times[t["trial_id"]].start if t["trial_id"] in times else None,
            "end": times[t["trial_id"]].end if t["trial_id"] in times else None,
            "policy_json": t["policy_json"],
        }
        for t in map(TrialRow.as_dict, outcome.trials)
    ]
    return {
        "name": name,
        "concurrency": concurrency,
        "wall_s": wall,
        "trials": trials,
        "measured_concurrency": _common.concurrency(times.values()),
        "nodes": len({t["node_id"] for t in trials}),
    }


def bare_loop(policies: Sequence[str], gpus: float) -> dict[str, Any]:
    """The same policies applied and measured in a plain loop: the work a trial exists to do."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # TensorLy's numpy BLAS, as in a 1-CPU Ray worker
        return _bare_loop(policies, gpus)


def _bare_loop(policies: Sequence[str], gpus: float) -> dict[str, Any]:
    device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
    workload = resolve_workload("digits")
    baseline = workload.load_baseline().to(device)
    reference = measure_reference(workload, baseline, device)
    walls = []
    print(f"bare loop over {len(policies)} policies ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    for text in policies:
        tick = time.perf_counter()
        executor.apply(Policy.loads(text), workload, device=device, baseline=baseline, reference=reference)
        walls.append(time.perf_counter() - tick)
    return {"wall_s": time.perf_counter() - started, "policy_wall_s": walls, "load_average": list(os.getloadavg())}


def local_searches(settings: Settings, storage: str) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    """Ray start-up time; the search at 1 concurrent trial, the first bare pass over its policies, then the
    search at 2 concurrent trials, on one local Ray."""
    started = time.perf_counter()
    with _common.local_ray(2):
        startup = time.perf_counter() - started
        serial = search(settings, storage, "local-1", 1)
        bare = bare_loop([t["policy_json"] for t in serial["trials"]], settings.gpus_per_trial)
        return startup, [serial, search(settings, storage, "local-2", 2)], bare


def cluster_search(settings: Settings, storage: str) -> tuple[float, dict[str, Any]]:
    """Cluster start-up time, then a search at 2 concurrent trials on 2 one-CPU nodes behind a 0-CPU head."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    gpus = 1 if settings.gpus_per_trial > 0 else 0
    nodes = [cluster.add_node(num_cpus=1, num_gpus=gpus) for _ in range(2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        startup = time.perf_counter() - started
        result = search(settings, storage, "cluster-2", 2, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    result["worker_nodes"] = [node.node_id for node in nodes]
    return startup, result


def _timeline(run: dict[str, Any]) -> dict[str, float]:
    """Trial-seconds, the span from the first trial's start to the last one's end, and the time outside it."""
    starts = [t["start"] for t in run["trials"] if t["start"] is not None]
    ends = [t["end"] for t in run["trials"] if t["end"] is not None]
    busy = sum(t["end"] - t["start"] for t in run["trials"] if t["start"] is not None)
    span = max(ends) - min(starts)
    return {"trial_s": busy, "span_s": span, "outside_s": run["wall_s"] - span}


def summarise(runs: list[dict[str, Any]], passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per run: throughput, ratio to the bare loop, where the time went, measured concurrency; and the
    1-concurrent search's time per trial split into in-trial work, gaps between trials, and start/collect."""
    n = len(passes[0]["policy_wall_s"])
    bare = {"wall_s": statistics.mean(p["wall_s"] for p in passes)}
    rows = {"bare loop": {"wall_s": bare["wall_s"], "trials_per_min": 60 * n / bare["wall_s"], "ratio_to_bare": 1.0}}
    for r in runs:
        rows[r["name"]] = {
            "wall_s": r["wall_s"],
            "trials_per_min": 60 * n / r["wall_s"],
            "ratio_to_bare": r["wall_s"] / bare["wall_s"],
            **_timeline(r),
            "measured_concurrency": r["measured_concurrency"],
            "nodes": r["nodes"],
        }
    serial = rows["local-1"]
    policy_sets = [sorted(t["policy_json"] for t in r["trials"]) for r in runs]
    return {
        "trials": n,
        "rows": rows,
        "per_trial_s": {
            "bare": bare["wall_s"] / n,
            "in_trial": serial["trial_s"] / n,
            "between_trials": (serial["span_s"] - serial["trial_s"]) / n,
            "search_start_and_collect": serial["outside_s"] / n,
            "total": serial["wall_s"] / n,
        },
        "overhead_ratio": serial["wall_s"] / bare["wall_s"],
        "in_trial_ratio": serial["trial_s"] / bare["wall_s"],
        "speedup_2_vs_1": rows["local-2"]["trials_per_min"] / serial["trials_per_min"],
        "cluster_vs_local_2": rows["cluster-2"]["trials_per_min"] / rows["local-2"]["trials_per_min"],
        "same_policies_everywhere": all(p == policy_sets[0] for p in policy_sets),
        "bare_passes_s": [p["wall_s"] for p in passes],
    }


LABELS = {
    "bare loop": "bare loop (executor.apply, 1 thread), mean of 2 passes",
    "local-1": "search, 1 concurrent (local Ray, 2 CPUs)",
    "local-2": "search, 2 concurrent (local Ray, 2 CPUs)",
    "cluster-2": "search, 2 concurrent (simulated cluster: 0-CPU head + 2 × 1-CPU nodes)",
}


def table(summary: dict[str, Any]) -> str:
    header = ["run", "trials/min", "wall s", "× bare", "trial-s", "trials' span s", "outside span s"]
    header += ["concurrency mean / max", "nodes"]
    rows = []
    for name, r in summary["rows"].items():
        measured = r.get("measured_concurrency", {"mean": 1.0, "max": 1})
        cells = [LABELS[name], f"{r['trials_per_min']:.1f}", f"{r['wall_s']:.1f}", f"{r['ratio_to_bare']:.2f}"]
        cells += [f"{r[k]:.1f}" if k in r else "–" for k in ("trial_s", "span_s", "outside_s")]
        cells += [f"{measured['mean']:.2f} / {measured['max']}", str(r.get("nodes", "–"))]
        rows.append(cells)
    return _common.markdown_table(header, rows)


def breakdown(summary: dict[str, Any]) -> str:
    """The 1-concurrent search's seconds per trial, part by part, against the bare loop's."""
    per = summary["per_trial_s"]
    bare = per["bare"]
    parts = [
        ("bare trial work (executor.apply + measurement)", bare),
        ("inside the trial (the work + per-epoch reports, artifact preview, checkpoint)", per["in_trial"]),
        ("between trials (scheduling, Optuna ask/tell, result handling)", per["between_trials"]),
        (
            "search start-up and collect (workload, space, Tuner, actors; front, test split, tables)",
            per["search_start_and_collect"],
        ),
        ("total: search wall time / trials", per["total"]),
    ]
    return _common.markdown_table(
        ["per trial, 1 concurrent", "s", "× bare"], [[name, f"{v:.3f}", f"{v / bare:.2f}"] for name, v in parts]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 trials of one fine-tune epoch")
    parser.add_argument("--trials", type=int, default=None, help=f"trials per run (default {TRIALS})")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON (default {DEFAULT_OUT}; --quick: temp dir)")
    args = parser.parse_args(argv)
    settings = Settings(
        trials=args.trials or (QUICK["trials"] if args.quick else TRIALS),
        gpus_per_trial=args.gpus_per_trial,
        space=QUICK["space"] if args.quick else {},
    )
    command = _common.command_line("orchestration_cost", argv)
    report = {"bench": "orchestration_cost", **_common.environment(command, (SEED,))}
    report.update(quick=args.quick, trials=settings.trials, sampler="random", space_overrides=settings.space)
    with _common.scratch() as storage:
        ray_start, runs, first = local_searches(settings, storage)
        cluster_start, cluster = cluster_search(settings, storage)
    runs.append(cluster)
    passes = [first, bare_loop([t["policy_json"] for t in runs[0]["trials"]], settings.gpus_per_trial)]
    report.update(ray_start_s=ray_start, cluster_start_s=cluster_start, runs=runs, bare=passes)
    report["summary"] = summarise(runs, passes)
    out = args.out or _common.default_out(DEFAULT_OUT, args.quick)
    _common.write_json(out, report)
    s = report["summary"]
    print(f"{command}\n{_common.header_line(report)}")
    print(
        f"{s['trials']} trials per run, random sampler, seed {SEED}; same policies in every run: "
        f"{s['same_policies_everywhere']}; Ray start {ray_start:.1f} s, cluster start {cluster_start:.1f} s "
        "(excluded)\n"
    )
    print(table(s))
    print()
    print(breakdown(s))
    print(
        f"\norchestration overhead: the search at 1 concurrent takes {s['overhead_ratio']:.2f}× the bare loop's time "
        f"({s['in_trial_ratio']:.2f}× counting the trials alone; bare passes "
        f"{' and '.join(f'{t:.1f}' for t in s['bare_passes_s'])} s); 2 concurrent: {s['speedup_2_vs_1']:.2f}× the "
        f"throughput of 1; simulated cluster: {s['cluster_vs_local_2']:.2f}× the local 2-concurrent throughput"
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Front quality on digits: the project's search against what users would otherwise do, same trial budget.

    python -m bench.front_quality [--quick] [--trials N] [--seeds 0 1 2] [--gpus-per-trial G]

Methods, each run once per seed with the same number of evaluated policies:
- NSGA-II, TPE and random search over the default space (`orchestrator.driver.run`), without the sensitivity
  prior; TPE with it (`tpe_prior`: its profile runs inside the search and counts in its wall time);
- the same search (NSGA-II) restricted to one technique: pruning only, quantization only, low-rank only;
- a uniform grid (one bit-width × one sparsity × one low-rank fraction for every layer, with the space's
  reference fine-tune), built by the search space itself from a single all-layers group;
- textbook recipes, one fixed policy each, with and without the same fine-tune.
Grid and recipes run on Ray actors, as many at once as the searches run trials. Everything is scored the
same way: the hypervolume of the validation front in (accuracy, log10 bytes) up to (0, log10 baseline bytes)
(`_common.front_hypervolume`), and, among front models, the smallest and the fastest within one point of
the baseline's test accuracy. Table to stdout, progress to stderr, raw numbers to the JSON file.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import _common
from orchestrator import executor
from orchestrator.artifacts.tables import TrialRow
from orchestrator.measure import measure_reference
from orchestrator.policy import Policy
from orchestrator.search import SearchConfig, run
from orchestrator.search.space import COMBINATION, build_space
from orchestrator.search.space_options import options_from_json
from orchestrator.workloads import Workload, resolve_workload

DEFAULT_OUT = "docs/bench/front_quality.json"
DEFAULT_PLOT = "docs/front_quality.png"
SEEDS = (0, 1, 2)
TRIALS = 24
# The fine-tune the search space gives its own uniform reference points (`GlobalSearch.reference` of distillation).
KD = {"temperature": 4.0, "alpha": 0.7, "epochs": 8, "lr": 1e-3}
# Uniform grid: 4 × 3 × 2 = 24 policies = the default trial budget.
GRID = {"bits": (2, 3, 4, 8), "sparsity": (0.0, 0.5, 0.8), "rank": ("none", 0.5)}
WITHIN = 0.01  # "within one point" of the baseline's test accuracy
QUICK_EPOCHS = 1
PRUNING = ("unstructured_pruning", "structured_pruning", "distillation")


@dataclass(frozen=True)
class Search:
    """A search method: its name in tables and the SearchConfig fields that make it."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)


SEARCHES = {
    "nsga2": Search("NSGA-II (all techniques)", {"sampler": "nsga2"}),
    "tpe": Search("TPE (all techniques)", {"sampler": "tpe"}),
    "random": Search("random search (all techniques)", {"sampler": "random"}),
    # the sensitivity prior (orchestrator.search.prior): its profile counts in the method's wall time
    "tpe_prior": Search("TPE + sensitivity prior (all techniques)", {"sampler": "tpe", "sensitivity": True}),
    "pruning": Search("pruning only (NSGA-II)", {"families": PRUNING, "sampler": "nsga2"}),
    "quantization": Search(
        "quantization only (NSGA-II)", {"families": ("quantization", "distillation"), "sampler": "nsga2"}
    ),
    "lowrank": Search("low-rank only (NSGA-II)", {"families": ("lowrank", "distillation"), "sampler": "nsga2"}),
}
METHODS = (*SEARCHES, "grid", "recipes")
QUICK_METHODS = ("nsga2", "quantization", "grid", "recipes")  # one full search, one single-technique search
GRID_NAME = "uniform grid"
RECIPES = (
    "random unstructured 30%",
    "L2 structured 50% channels",
    "int8 linear (w8a8)",
)


# --------------------------------------------------------------------------- fixed policies


def grid_policies(baseline: nn.Module, seed: int, kd: dict[str, Any]) -> list[Policy]:
    """Every (bits, sparsity, rank) of GRID for all layers at once, as the search space builds it from one
    all-layers group (so each family acts on exactly the layers it searches: no structured pruning of the
    output layer, no factorising layers too small to shrink)."""
    space = build_space(baseline, options_from_json({"groups": {"all": "re:.*"}}), seed=seed)
    distill = {f"distill.{k}": v for k, v in kd.items()}
    policies = []
    for bits, sparsity, rank in itertools.product(*GRID.values()):
        params = {
            COMBINATION: "lowrank+unstructured_pruning+quantization",
            "rank.all": rank,
            "sparsity.all": sparsity,
            "bits.all": bits,
            **distill,
        }
        policy = space.policy(params)
        policies.append(Policy(policy.steps, seed=seed, name=f"w{bits} s{sparsity:g} r{rank}"))
    return policies


def _step(kind: str, **data: Any) -> dict[str, Any]:
    return {"_type": kind, "_version": 1, "_data": data}


def recipe_policies(baseline: nn.Module, seed: int, kd: dict[str, Any]) -> dict[str, Policy]:
    """The textbook recipes, each alone and followed by the fine-tune."""
    linear = {name: 8 for name, m in baseline.named_modules() if isinstance(m, nn.Linear)}
    recipes = {
        RECIPES[0]: _step("unstructured_pruning", sparsity=0.3, criterion="random"),
        RECIPES[1]: _step("structured_pruning", ratio={"_default": 0.5}, importance="l2"),
        RECIPES[2]: _step("quantization", bits=linear, activation_bits=8),
    }
    policies = {}
    for name, step in recipes.items():
        for suffix, steps in (("", [step]), (" + KD", [step, _step("distillation", **kd)])):
            doc = {"_type": "policy", "_version": 1, "seed": seed, "name": name + suffix, "steps": steps}
            policies[name + suffix] = Policy.from_json(doc)
    return policies


def _applier_class(gpus: float) -> Any:
    import ray

    @ray.remote(num_cpus=1, num_gpus=gpus)
    class Applier:
        """Applies fixed policies like a trial does (one torch thread per CPU, baseline measured here)."""

        def __init__(self) -> None:
            torch.set_num_threads(1)
            self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
            self.workload = resolve_workload("digits")
            self.baseline = self.workload.load_baseline().to(self.device)
            self.reference = measure_reference(self.workload, self.baseline, self.device)

        def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
            policy = Policy.from_json(doc)
            started = time.perf_counter()
            out = executor.apply(
                policy, self.workload, device=self.device, baseline=self.baseline, reference=self.reference
            )
            row = {k: out.metrics[k] for k in ("validation", "size_bytes", "latency_ms", "speedup", "params")}
            row["test"] = self.workload.evaluate(out.model, "test", self.device)
            row["wall_s"] = time.perf_counter() - started
            return row

    return Applier


def apply_all(policies: Sequence[Policy], workers: int, gpus: float) -> tuple[list[dict[str, Any]], float]:
    """Rows of the policies (in order) and the wall time, `workers` at a time on Ray actors."""
    import ray
    from ray.util import ActorPool

    started = time.perf_counter()
    applier = _applier_class(gpus)
    actors = [applier.remote() for _ in range(min(workers, len(policies)))]
    rows = list(ActorPool(actors).map(lambda actor, doc: actor.apply.remote(doc), [p.to_json() for p in policies]))
    for actor in actors:  # free their CPUs for the next search now, not when garbage-collected
        ray.kill(actor)
    for row, policy in zip(rows, policies, strict=True):
        row.update(name=policy.name, techniques=",".join(policy.techniques()), epochs=policy.fine_tune_epochs())
    return rows, time.perf_counter() - started


# --------------------------------------------------------------------------- scoring


def score(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> dict[str, Any]:
    """Hypervolumes of the rows' front, and its smallest and fastest model within a point of baseline test."""
    on_front = _common.front(rows)
    good = [r for r in on_front if r.get("test") is not None and r["test"] >= baseline["test"] - WITHIN - 1e-9]
    smallest = min(good, key=lambda r: r["size_bytes"], default=None)
    fastest = max(good, key=lambda r: r["speedup"], default=None)
    return {
        **_common.hypervolumes(rows, baseline),
        "front": [_brief(r) for r in on_front],
        # sampled trials whose policy is empty (every layer of the families picked left "off"): the baseline again
        "baseline_reruns": sum(r.get("role") == "search" and not r["techniques"] for r in rows),
        "smallest_within_1pt": _brief(smallest) if smallest else None,
        "fastest_within_1pt": _brief(fastest) if fastest else None,
    }


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "trial_id", "validation", "test", "size_bytes", "speedup", "latency_ms", "techniques", "epochs")
    return {k: row[k] for k in keys if k in row}


def search_rows(outcome: Any) -> list[dict[str, Any]]:
    """Completed trials as plain rows; `test` is known for the Pareto ones only (as the search gives it)."""
    rows = []
    for t in map(TrialRow.as_dict, outcome.trials):
        if t["status"] != "completed":
            continue
        keys = ("trial_id", "role", "validation", "size_bytes", "latency_ms", "speedup", "techniques")
        row = {k: t[k] for k in keys}
        row.update(epochs=t["epochs_completed"], wall_s=t["wall_s"], test=t.get("test"), pareto=t["pareto"])
        if t["pareto"]:
            row["policy_json"] = t["policy_json"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Settings:
    trials: int
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    concurrency: int
    gpus_per_trial: float
    quick: bool


def run_search(settings: Settings, key: str, seed: int, storage: str) -> dict[str, Any]:
    """One run of a search method."""
    method = SEARCHES[key]
    print(f"[seed {seed}] {method.name} ...", file=sys.stderr, flush=True)
    fields = {"sensitivity": False, **method.config}  # the prior only where a method names it
    space = {"families": list(fields.pop("families"))} if "families" in fields else {}
    if settings.quick:
        space["distillation"] = {"epochs": [QUICK_EPOCHS]}
    config = SearchConfig(
        max_accuracy_drop=None,  # as measured with 0.1: no accuracy guard (see docs/BENCHMARKS.md)
        num_trials=settings.trials,
        seed=seed,
        concurrency=settings.concurrency,
        gpus_per_trial=settings.gpus_per_trial,
        storage_path=storage,
        name=f"{key}-seed{seed}",
        report=False,
        space=options_from_json(space),
        **fields,
    )
    started = time.perf_counter()
    outcome = run(config)
    wall = time.perf_counter() - started
    return {"method": method.name, "kind": "search", "seed": seed, "wall_s": wall, "rows": search_rows(outcome)}


def run_grid(settings: Settings, seed: int, baseline: nn.Module) -> list[dict[str, Any]]:
    """The uniform grid for a seed (in --quick, an even spread of it, as many as the trial budget)."""
    grid = grid_policies(baseline, seed, {**KD, "epochs": QUICK_EPOCHS} if settings.quick else KD)
    if settings.quick:
        grid = grid[:: math.ceil(len(grid) / settings.trials)][: settings.trials]
    print(f"[seed {seed}] uniform grid ({len(grid)} policies) ...", file=sys.stderr, flush=True)
    rows, wall = apply_all(grid, settings.concurrency, settings.gpus_per_trial)
    return [{"method": GRID_NAME, "kind": "grid", "seed": seed, "wall_s": wall, "rows": rows}]


def run_recipes(settings: Settings, seed: int, baseline: nn.Module) -> list[dict[str, Any]]:
    """Every recipe for a seed, each its own method (they run side by side; wall = the policy's own time)."""
    recipes = recipe_policies(baseline, seed, {**KD, "epochs": QUICK_EPOCHS} if settings.quick else KD)
    print(f"[seed {seed}] textbook recipes ({len(recipes)} policies) ...", file=sys.stderr, flush=True)
    rows, _ = apply_all(list(recipes.values()), settings.concurrency, settings.gpus_per_trial)
    return [{"method": r["name"], "kind": "recipe", "seed": seed, "wall_s": r["wall_s"], "rows": [r]} for r in rows]


def measure_baseline(workload: Workload, model: nn.Module) -> dict[str, Any]:
    """The baseline's accuracies and bytes (deterministic; its latency is the trials' business: a driver-side
    timing with every core's threads on a busy machine says nothing about a one-thread trial)."""
    reference = measure_reference(workload, model, torch.device("cpu"))
    return {
        "validation": reference.metric,
        "test": workload.evaluate(model, "test"),
        "size_bytes": reference.measurements.size_bytes,
        "params": reference.measurements.params,
        "flops": reference.measurements.flops,
    }


def measure(settings: Settings, report: dict[str, Any]) -> None:
    """Every chosen method for every seed, then the scores."""
    workload = resolve_workload("digits")
    baseline_model = workload.load_baseline()
    baseline = measure_baseline(workload, baseline_model)
    runs: list[dict[str, Any]] = []
    with _common.local_ray(settings.concurrency), _common.scratch() as storage:
        for seed in settings.seeds:
            runs += [run_search(settings, key, seed, storage) for key in settings.methods if key in SEARCHES]
            if "grid" in settings.methods:
                runs += run_grid(settings, seed, baseline_model)
            if "recipes" in settings.methods:
                runs += run_recipes(settings, seed, baseline_model)
    for entry in runs:
        entry.update(score(entry["rows"], baseline))
    report["baseline"] = baseline
    report["runs"] = runs
    report["summary"] = summarise(runs)
    report["verdict"] = verdict(report["summary"])


# --------------------------------------------------------------------------- summary


def _pick(runs: list[dict[str, Any]], key: str, field_: str) -> list[float]:
    return [r[key][field_] for r in runs if r[key] is not None]


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: hypervolumes per seed, and the smallest / fastest model within a point per seed."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        out[method] = {
            "kind": mine[0]["kind"],
            "hv": [r["hv"] for r in mine],
            "hv_near": [r["hv_near"] for r in mine],
            "smallest_kib": [b / 1024 for b in _pick(mine, "smallest_within_1pt", "size_bytes")],
            "fastest_speedup": _pick(mine, "fastest_within_1pt", "speedup"),
            "seeds_within_1pt": sum(r["smallest_within_1pt"] is not None for r in mine),
            "wall_s": [r["wall_s"] for r in mine],
            "policies": [len(r["rows"]) for r in mine],
            "baseline_reruns": [r["baseline_reruns"] for r in mine],
        }
    return out


def verdict(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """For each of the project's samplers against every other method: seeds won on hypervolume (paired)."""
    out = {}
    for ours in (SEARCHES[key].name for key in ("nsga2", "tpe", "tpe_prior") if SEARCHES[key].name in summary):
        mine = summary[ours]
        out[ours] = {
            other: {
                "hv_wins": sum(a > b for a, b in zip(mine["hv"], s["hv"], strict=True)),
                "hv_near_wins": sum(a > b for a, b in zip(mine["hv_near"], s["hv_near"], strict=True)),
                "seeds": len(mine["hv"]),
                "mean_hv_higher": statistics.mean(mine["hv"]) > statistics.mean(s["hv"]),
            }
            for other, s in summary.items()
            if other != ours
        }
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    header = [
        "method",
        "policies",
        "of which baseline re-runs",
        "HV (acc 0)",
        f"HV (acc ≥ base−{_common.NEAR:g})",
        "smallest ≤1pt KiB",
        "fastest ≤1pt ×",
        "seeds ≤1pt",
        "wall s",
    ]
    rows = []
    for method, s in summary.items():
        rows.append(
            [
                method,
                s["policies"][0],
                _common.mean_std(s["baseline_reruns"], 1),
                _common.mean_std(s["hv"]),
                _common.mean_std(s["hv_near"], 4),
                _common.mean_std(s["smallest_kib"], 1),
                _common.mean_std(s["fastest_speedup"], 2),
                f"{s['seeds_within_1pt']}/{len(s['hv'])}",
                _common.mean_std(s["wall_s"], 0),
            ]
        )
    return _common.markdown_table(header, rows)


def verdict_lines(result: dict[str, Any]) -> str:
    lines = []
    for ours, others in result.items():
        for other, v in others.items():
            lines.append(
                f"{ours} vs {other}: higher HV in {v['hv_wins']}/{v['seeds']} seeds "
                f"(near-baseline HV {v['hv_near_wins']}/{v['seeds']}), mean HV higher: {v['mean_hv_higher']}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot(report: dict[str, Any], path: Path) -> None:
    """Seed-0 fronts of every search and the grid as steps, recipes as points; full range and near baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    seed = report["seeds"][0]
    base = report["baseline"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    lines = iter(f"C{i}" for i in range(10))
    shapes = dict(zip(RECIPES, "s^D", strict=True))  # recipes: black, hollow without KD, filled with it
    for entry in (r for r in report["runs"] if r["seed"] == seed):
        points = entry["front"]
        x = [p["size_bytes"] / 1024 for p in points]
        y = [p["validation"] for p in points]
        if entry["kind"] == "recipe":
            recipe = entry["method"].removesuffix(" + KD")
            style = {"marker": shapes[recipe], "s": 50, "edgecolors": "black", "zorder": 3}
            style["facecolors"] = "black" if entry["method"].endswith("KD") else "none"
            for ax in axes:
                ax.scatter(x, y, label=entry["method"], **style)
        else:
            colour = next(lines)
            for ax in axes:
                ax.step(x, y, where="post", marker=".", color=colour, label=entry["method"])
    for ax, low in zip(axes, (0.0, base["validation"] - _common.NEAR), strict=True):
        ax.axhline(base["validation"], color="grey", lw=0.8, ls="--")
        ax.axvline(base["size_bytes"] / 1024, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(low, 1.005)
        ax.set_xlabel("size on disk (KiB, log)")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"digits: validation fronts, seed {seed} (dashed: baseline)")
    axes[1].set_title(f"zoom: within {_common.NEAR * 100:g} points of the baseline")
    axes[1].legend(fontsize=7, loc="lower right")
    _common.save_figure(fig, path)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 3 trials of 1 epoch, fewer methods")
    parser.add_argument("--trials", type=int, default=None, help=f"policies per method and seed (default {TRIALS})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, SEEDS))}")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=None, help=f"default all; --quick: {' '.join(QUICK_METHODS)}"
    )
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once = Ray CPUs (default 2)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON (default {DEFAULT_OUT}; --quick: temp dir)")
    parser.add_argument("--plot", type=Path, default=None, help=f"PNG of the fronts (default {DEFAULT_PLOT})")
    args = parser.parse_args(argv)
    settings = Settings(
        trials=args.trials or (3 if args.quick else TRIALS),
        seeds=tuple(args.seeds or ((0,) if args.quick else SEEDS)),
        methods=tuple(args.methods or (QUICK_METHODS if args.quick else METHODS)),
        concurrency=args.concurrency,
        gpus_per_trial=args.gpus_per_trial,
        quick=args.quick,
    )
    command = _common.command_line("front_quality", argv)
    report = {"bench": "front_quality", **_common.environment(command, settings.seeds)}
    report.update(
        quick=settings.quick,
        trials=settings.trials,
        methods=settings.methods,
        concurrency=settings.concurrency,
        kd=KD,
        grid=GRID,
        hv_reference=_common.HV_REFERENCE,
        hv_unit=_common.HV_UNIT,
    )
    started = time.perf_counter()
    measure(settings, report)
    report["wall_s"] = time.perf_counter() - started
    out = args.out or _common.default_out(DEFAULT_OUT, settings.quick)
    _common.write_json(out, report)
    plot_path = args.plot or (out.with_suffix(".png") if settings.quick else Path(DEFAULT_PLOT))
    plot(report, plot_path)
    base = report["baseline"]
    print(f"{command}\n{_common.header_line(report)}")
    print(
        f"baseline: validation {base['validation']:.4f}, test {base['test']:.4f}, "
        f"{base['size_bytes'] / 1024:.1f} KiB; HV in {_common.HV_UNIT}\n"
    )
    print(table(report["summary"]))
    print()
    print(verdict_lines(report["verdict"]))
    print(f"\nwrote {out} and {plot_path} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

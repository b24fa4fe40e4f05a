"""Early stopping: hypervolume reached versus fine-tuning epochs spent, with and without ASHA, on digits.

    python -m bench.early_stopping [--quick] [--trials N] [--seeds 0 1 2] [--gpus-per-trial G]

For each seed, an NSGA-II search over the default space runs twice with the same trial budget:
plain, and with `asha=True` (ASHA on the distillation epochs: grace 1, reduction factor 2, rungs 1, 2, 4, 8).
Each trial's epochs actually run are the largest `epoch` it reported (`_common.trial_times`). Trials are
taken in the order they ended; after each, the cumulative epochs and the hypervolume of the completed
trials so far (stopped trials are never on the front) give one point of the curve. Hypervolume as in
front_quality.py. Table to stdout, raw curves to the JSON file, curves to docs/early_stopping.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _common
from orchestrator.artifacts.tables import TrialRow
from orchestrator.policy import Policy
from orchestrator.search import SearchConfig, run
from orchestrator.search.space_options import options_from_json

DEFAULT_OUT = "docs/bench/early_stopping.json"
DEFAULT_PLOT = "docs/early_stopping.png"
SEEDS = (0, 1, 2, 3, 4)
TRIALS = 32
QUICK = {"trials": 4, "space": {"distillation": {"epochs": [2]}}}


@dataclass(frozen=True)
class Settings:
    trials: int
    seeds: tuple[int, ...]
    concurrency: int
    gpus_per_trial: float
    space: dict[str, Any]


def curve(rows: list[dict[str, Any]], times: dict[str, _common.TrialTimes], baseline: dict[str, Any]) -> list:
    """[(cumulative epochs, HV, HV near baseline)] after each trial, in the order the trials ended."""
    ended = sorted(rows, key=lambda r: times[r["trial_id"]].end)
    points, done, spent = [], [], 0
    for row in ended:
        spent += times[row["trial_id"]].epochs
        if row["status"] == "completed":
            done.append(row)
        points.append([spent, *_common.hypervolumes(done, baseline).values()])
    return points


def one_search(settings: Settings, storage: str, seed: int, asha: bool) -> dict[str, Any]:
    name = f"{'asha' if asha else 'plain'}-{seed}"
    print(f"search {name} ...", file=sys.stderr, flush=True)
    config = SearchConfig(
        max_accuracy_drop=None,  # as measured with 0.1: no accuracy guard (see docs/BENCHMARKS.md)
        sampler="nsga2",
        num_trials=settings.trials,
        seed=seed,
        asha=asha,
        concurrency=settings.concurrency,
        gpus_per_trial=settings.gpus_per_trial,
        storage_path=storage,
        name=name,
        report=False,
        space=options_from_json(settings.space),
    )
    started = time.perf_counter()
    outcome = run(config)
    wall = time.perf_counter() - started
    times = _common.trial_times(outcome.run_dir)
    baseline = outcome.run_info.to_json()["baseline"]
    trials = [
        {
            "trial_id": t["trial_id"],
            "status": t["status"],
            "validation": t["validation"],
            "size_bytes": t["size_bytes"],
            "epochs_planned": Policy.loads(t["policy_json"]).fine_tune_epochs(),
            "epochs_run": times[t["trial_id"]].epochs,
        }
        for t in map(TrialRow.as_dict, outcome.trials)
        if t["trial_id"] in times  # a trial that failed before its first report ran no epoch
    ]
    points = curve(trials, times, baseline)
    completed = [t["size_bytes"] for t in trials if t["status"] == "completed" and t["epochs_planned"] > 0]
    return {
        "asha": asha,
        "seed": seed,
        "wall_s": wall,
        "baseline": baseline,
        "trials": trials,
        "curve": points,
        "epochs": points[-1][0],
        "hv": points[-1][1],
        "hv_near": points[-1][2],
        "stopped": sum(t["status"] == "stopped_early" for t in trials),
        "completed_compressed": len(completed),
        "smallest_completed_kib": min(completed, default=baseline["size_bytes"]) / 1024,
        # stopped at their last planned epoch: every epoch was spent, the result is thrown away all the same
        "stopped_after_all_epochs": sum(
            t["status"] == "stopped_early" and t["epochs_run"] >= t["epochs_planned"] for t in trials
        ),
    }


def hv_at(points: list, epochs: float, column: int = 1) -> float:
    """The curve's hypervolume once `epochs` epochs had been spent (a step function; 0 before any trial)."""
    return max((p[column] for p in points if p[0] <= epochs), default=0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds per setting, and the plain search's HV at the epochs each ASHA run spent (paired)."""
    out: dict[str, Any] = {}
    for asha in (False, True):
        mine = [r for r in runs if r["asha"] is asha]
        out["asha" if asha else "plain"] = {
            key: [r[key] for r in mine]
            for key in (
                "hv",
                "hv_near",
                "epochs",
                "stopped",
                "stopped_after_all_epochs",
                "completed_compressed",
                "smallest_completed_kib",
                "wall_s",
            )
        }
    pairs = [(p, a) for p in runs if not p["asha"] for a in runs if a["asha"] and a["seed"] == p["seed"]]
    out["plain_at_asha_epochs"] = {
        "hv": [hv_at(p["curve"], a["epochs"]) for p, a in pairs],
        "hv_near": [hv_at(p["curve"], a["epochs"], 2) for p, a in pairs],
        "epochs": [a["epochs"] for _, a in pairs],
    }
    return out


def table(summary: dict[str, Any], trials: int) -> str:
    header = ["setting", "trials", "epochs spent", "stopped early", "… of them after all their epochs"]
    header += ["completed compressed", "smallest completed KiB", "HV (acc 0)", f"HV (acc ≥ base−{_common.NEAR:g})"]
    header.append("wall s")
    labels = {
        "plain": "no early stopping",
        "asha": "ASHA (grace 1 epoch, reduction 2)",
        "plain_at_asha_epochs": "no early stopping, cut at ASHA's epochs",
    }
    rows = []
    for key, label in labels.items():
        s = summary[key]
        rows.append(
            [
                label,
                trials if key != "plain_at_asha_epochs" else "(fewer)",
                _common.mean_std(s["epochs"], 0),
                _common.mean_std(s["stopped"], 1) if "stopped" in s else "–",
                _common.mean_std(s["stopped_after_all_epochs"], 1) if "stopped" in s else "–",
                _common.mean_std(s["completed_compressed"], 1) if "stopped" in s else "–",
                _common.mean_std(s["smallest_completed_kib"], 1) if "stopped" in s else "–",
                _common.mean_std(s["hv"]),
                _common.mean_std(s["hv_near"], 4),
                _common.mean_std(s["wall_s"], 0) if "wall_s" in s else "–",
            ]
        )
    return _common.markdown_table(header, rows)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """HV (both references) against cumulative epochs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
    for r in runs:
        x = [p[0] for p in r["curve"]]
        colour, label = ("C1", "ASHA") if r["asha"] else ("C0", "no early stopping")
        style = {"color": colour, "ls": styles[r["seed"] % len(styles)], "label": f"{label}, seed {r['seed']}"}
        for ax, column in zip(axes, (1, 2), strict=True):
            ax.step(x, [p[column] for p in r["curve"]], where="post", **style)
            ax.plot(x[-1:], [r["curve"][-1][column]], "o", color=colour)
    axes[0].set_ylabel(f"hypervolume ({_common.HV_UNIT})")
    axes[0].set_title("HV, reference accuracy 0")
    axes[1].set_title(f"HV, reference accuracy baseline − {_common.NEAR:g}")
    for ax in axes:
        ax.set_xlabel("fine-tuning epochs spent (cumulative, trials in order of completion)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    _common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 trials of 2 epochs")
    parser.add_argument("--trials", type=int, default=None, help=f"trials per search (default {TRIALS})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, SEEDS))}")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once = Ray CPUs (default 2)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON (default {DEFAULT_OUT}; --quick: temp dir)")
    parser.add_argument("--plot", type=Path, default=None, help=f"PNG (default {DEFAULT_PLOT}; --quick: temp dir)")
    args = parser.parse_args(argv)
    settings = Settings(
        trials=args.trials or (QUICK["trials"] if args.quick else TRIALS),
        seeds=tuple(args.seeds or ((0,) if args.quick else SEEDS)),
        concurrency=args.concurrency,
        gpus_per_trial=args.gpus_per_trial,
        space=QUICK["space"] if args.quick else {},
    )
    command = _common.command_line("early_stopping", argv)
    report = {"bench": "early_stopping", **_common.environment(command, settings.seeds)}
    report.update(quick=args.quick, trials=settings.trials, concurrency=settings.concurrency, space=settings.space)
    report.update(hv_reference=_common.HV_REFERENCE, hv_unit=_common.HV_UNIT)
    started = time.perf_counter()
    with _common.local_ray(settings.concurrency), _common.scratch() as storage:
        runs = [one_search(settings, storage, seed, asha) for seed in settings.seeds for asha in (False, True)]
    report.update(runs=runs, summary=summarise(runs), wall_s=time.perf_counter() - started)
    out = args.out or _common.default_out(DEFAULT_OUT, args.quick)
    _common.write_json(out, report)
    plot_path = args.plot or (out.with_suffix(".png") if args.quick else Path(DEFAULT_PLOT))
    plot(runs, plot_path)
    print(f"{command}\n{_common.header_line(report)}\nHV in {_common.HV_UNIT}\n")
    print(table(report["summary"], settings.trials))
    wins = report["summary"]["plain_at_asha_epochs"]
    better = sum(r["hv"] > p for r, p in zip((r for r in runs if r["asha"]), wins["hv"], strict=True))
    print(
        f"\nASHA's final HV beats the plain search's HV at the same epochs in {better}/{len(wins['hv'])} seeds; "
        f"mean epochs spent {statistics.mean(report['summary']['asha']['epochs']):.0f} with ASHA vs "
        f"{statistics.mean(report['summary']['plain']['epochs']):.0f} without"
    )
    print(f"wrote {out} and {plot_path} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

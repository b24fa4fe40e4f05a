"""The search command line (`python search.py`, `python -m orchestrator search`): flags → SearchConfig."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from orchestrator.driver import SearchConfig, SearchOutcome
from orchestrator.errors import UserError
from orchestrator.space import FAMILIES, GROUPINGS

SMOKE_TRIALS = 6


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="digits", help="digits (default), cifar10, or package.module:function")
    parser.add_argument("--data-dir", help="data directory (cifar10: the CIFAR-10 python batches)")
    parser.add_argument("--weights", help="cifar10: baseline weights as a local safetensors file")
    parser.add_argument(
        "--objectives",
        type=_csv,
        default=("accuracy", "size"),
        help="comma-separated, from accuracy, size, latency, flops (default: accuracy,size)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        help="hard constraint: trials losing more validation accuracy (a fraction; 0.01 = one "
        "point) are infeasible and never on the front",
    )
    parser.add_argument("--num-trials", type=int, default=32, help="trial budget, baseline and references included")
    parser.add_argument("--sampler", default="tpe", choices=("tpe", "nsga2", "random"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--families",
        type=_csv,
        default=FAMILIES,
        help=f"technique families to search (default: all of {','.join(FAMILIES)})",
    )
    parser.add_argument(
        "--grouping",
        default="auto",
        choices=GROUPINGS,
        help="one search parameter per layer, per block, or per layer type (auto: layer up to 12)",
    )
    parser.add_argument("--search-space", dest="space_file", help="JSON file overriding ranges, groups, families")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.5")
    parser.add_argument("--concurrency", type=int, help="trials at once (default: cores / cpus-per-trial)")
    parser.add_argument("--asha", action="store_true", help="stop weak fine-tunes early (ASHA on epochs)")
    parser.add_argument("--storage-path", default="runs", help="results root: a local path or s3://, gs://")
    parser.add_argument("--name", help="run name (default: workload and time); the run directory is STORAGE/NAME")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run --name")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join ('auto' on a cluster's head node); default: start Ray locally",
    )
    parser.add_argument("--max-failures", type=int, default=1, help="retries of a trial lost to a node or error")
    parser.add_argument("--latency-batch-size", type=int, default=1)
    parser.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"a tiny search ({SMOKE_TRIALS} trials, 1 fine-tuning epoch) to check the set-up",
    )


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    if args.resume and not args.name:
        raise UserError("--resume needs the --name of the run to continue")
    fields = {k: v for k, v in vars(args).items() if k in SearchConfig.__dataclass_fields__}
    if args.smoke_test:
        fields["num_trials"] = min(args.num_trials, SMOKE_TRIALS)
        fields["space_overrides"] = {"distillation": {"epochs": [1]}}
    return SearchConfig(**fields)


def print_outcome(outcome: SearchOutcome) -> None:
    from orchestrator.report import format_front_table

    finished = sum(r["status"] == "completed" for r in outcome.trials)
    failed = sum(r["status"] == "failed" for r in outcome.trials)
    print(f"\n{finished} trials finished, {failed} failed; {len(outcome.pareto)} on the Pareto front\n")
    print(format_front_table(outcome.pareto, outcome.run_info))
    print(f"\nrun directory: {outcome.run_dir}")
    if outcome.report:
        print(f"report:        {outcome.report}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python search.py`: the `search` subcommand of `python -m orchestrator`."""
    from orchestrator.cli import main as cli_main

    return cli_main(["search", *(sys.argv[1:] if argv is None else argv)])

"""The search command line (`python search.py`, `python -m orchestrator search`): flags → SearchConfig."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import PurePosixPath as Path

from orchestrator.cli._parser import Arguments, add_latency_batch_argument, add_target_argument, add_workload_arguments
from orchestrator.errors import UserError
from orchestrator.search.config import DEFAULT_TRIALS, DEFAULTS, SAMPLERS, SearchConfig, SearchOutcome
from orchestrator.search.space_options import GROUPINGS, SpaceOptions, check_families, load_space_file, searchable

SMOKE_TRIALS = 6
NOT_FLAGS = ("space", "extra_ray_init")  # settings no single flag sets: the space is the file and two flags


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def max_accuracy_drop(text: str) -> float | None:
    """A fraction in [0, 1], or `none` (any case) for no guard."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"a fraction from 0 to 1 (0.01 = one point) or none, got {text!r}")
    return value


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The search's flags, one help section per part of SearchConfig: what to search and how, then where trials
    run, where results go, how models are measured. Every default is `DEFAULTS`' (the config's dataclasses)."""
    _add_what_arguments(parser)
    _add_prior_argument(parser)
    parser.add_argument("--asha", action="store_true", help="stop weak fine-tunes early (ASHA on epochs)")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"a tiny search ({SMOKE_TRIALS} trials, 1 fine-tuning epoch) to check the set-up",
    )
    _add_resource_arguments(parser.add_argument_group("resources", "where trials run and what each takes"))
    _add_run_arguments(parser.add_argument_group("run", "where the results go, resuming, tracking"))
    measure = parser.add_argument_group("measurement", "how sizes and latencies are measured")
    add_target_argument(measure, default=DEFAULTS["target"])
    add_latency_batch_argument(measure)


def _add_prior_argument(parser: Arguments) -> None:
    parser.add_argument(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS["sensitivity"],
        help="before the trials, measure each layer group's metric drop under each setting alone (no fine-tuning; "
        "Ray tasks, cached per workload), seed policies for 4x/6x/8x size budgets and stop proposing settings "
        "that break --max-accuracy-drop on their own "
        f"(default: {'on' if DEFAULTS['sensitivity'] else 'off'})",
    )


def _add_what_arguments(parser: Arguments) -> None:
    add_workload_arguments(parser)
    parser.add_argument(
        "--objectives",
        type=_csv,
        metavar="LIST",
        default=DEFAULTS["objectives"],
        help=f"comma-separated, from accuracy, size, latency, flops (default: {','.join(DEFAULTS['objectives'])})",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=max_accuracy_drop,
        default=DEFAULTS["max_accuracy_drop"],
        metavar="FRACTION",
        help="trials losing more validation accuracy than this fraction of the baseline's (0.05 = five points) "
        "are infeasible: kept in the tables and plots, marked, never on the front; `none` disables the guard",
    )
    parser.add_argument(
        "--num-trials",
        type=int,
        default=DEFAULTS["num_trials"],
        metavar="N",
        help=f"trial budget, baseline and references included (default: {DEFAULT_TRIALS} for a new run; "
        "with --resume, the run's own budget, which a larger value extends)",
    )
    parser.add_argument(
        "--sampler",
        default=DEFAULTS["sampler"],
        choices=SAMPLERS,
        help="how trials are proposed: Optuna's multi-objective TPE, NSGA-II, or random search",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        metavar="N",
        help="seed of the sampler and of every trial's policy",
    )
    parser.add_argument(
        "--families",
        type=_csv,
        metavar="LIST",
        help=f"technique families to search, comma-separated (default: all of {', '.join(searchable())})",
    )
    parser.add_argument(
        "--grouping",
        choices=GROUPINGS,
        help="one search parameter per layer, per block, or per layer type "
        "(default: the search-space file's, else auto: per layer up to 12 layers, else by layer role and depth)",
    )
    parser.add_argument(
        "--search-space",
        dest="space_file",
        metavar="FILE",
        help="JSON file overriding ranges, groups, families (default: none: the space built from the model)",
    )


def _add_resource_arguments(parser: Arguments) -> None:
    """Where trials run and what each takes (`Resources`)."""
    parser.add_argument(
        "--cpus-per-trial",
        type=float,
        default=DEFAULTS["cpus_per_trial"],
        metavar="N",
        help="CPU cores per trial, fractions allowed",
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        default=DEFAULTS["gpus_per_trial"],
        metavar="N",
        help="GPUs per trial, fractions allowed, e.g. 0.5",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULTS["concurrency"],
        metavar="N",
        help="trials at once (default: cores / cpus-per-trial)",
    )
    parser.add_argument(
        "--address",
        default=DEFAULTS["address"],
        help="Ray cluster to join ('auto': the one on this node), or 'local' for a private Ray; default: "
        "RAY_ADDRESS when set (Ray Jobs, KubeRay and cluster.yaml's head set it), else a private local Ray",
    )


def _add_run_arguments(parser: Arguments) -> None:
    """Where results go, resuming, retries, the report and tracking (`RunSettings`)."""
    parser.add_argument(
        "--storage-path",
        default=DEFAULTS["storage_path"],
        metavar="PATH",
        help="results root: a local path or s3://, gs://",
    )
    parser.add_argument(
        "--name",
        default=DEFAULTS["name"],
        help="run name; the run directory is STORAGE/NAME (default: the workload and the time)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run --name")
    parser.add_argument(
        "--max-failures",
        type=int,
        default=DEFAULTS["max_failures"],
        metavar="N",
        help="retries of a trial lost to a node or error",
    )
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="skip report.html (default: off: the report is written)",
    )
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        default=DEFAULTS["mlflow"],
        metavar="URI",
        help="log each trial's parameters, metrics and policy to MLflow (default store: mlruns/ beside the run "
        "directory); default: off",
    )
    parser.add_argument(
        "--wandb", action="store_true", help="log to Weights & Biases (offline mode unless WANDB_MODE is set)"
    )


def space_options(args: argparse.Namespace) -> SpaceOptions:
    """The search-space file and the --families/--grouping flags as one SpaceOptions; a flag may not
    contradict the file."""
    options = load_space_file(args.space_file) if args.space_file else SpaceOptions()
    if args.families is not None:
        families = check_families(args.families, "--families")
        if options.families is not None and set(options.families) != set(families):
            raise UserError("--families contradicts the search-space file's families; give one of them")
        options = dataclasses.replace(options, families=families)
    if args.grouping is not None:
        if args.space_file and options.grouping != "auto" and options.grouping != args.grouping:
            raise UserError("--grouping contradicts the search-space file's grouping; give one of them")
        options = dataclasses.replace(options, grouping=args.grouping)
    if args.smoke_test:  # one fine-tuning epoch, whatever the file says
        tuner = next(name for name, t in searchable().items() if t.fine_tunes)
        ranges = {**options.ranges, tuner: {**options.ranges.get(tuner, {}), "epochs": (1,)}}
        options = dataclasses.replace(options, ranges=ranges)
    return options


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The parsed flags as a SearchConfig."""
    if args.resume and not args.name:
        raise UserError("--resume needs the --name of the run to continue")
    settings = {name: getattr(args, name) for name in DEFAULTS if name not in NOT_FLAGS}
    if args.smoke_test:
        settings["num_trials"] = min(DEFAULT_TRIALS if args.num_trials is None else args.num_trials, SMOKE_TRIALS)
    return SearchConfig(**settings, space=space_options(args))


def print_outcome(outcome: SearchOutcome) -> None:
    from orchestrator.report import format_front_table

    print(f"\n{outcome.finished} trials finished, {outcome.failed} failed; {len(outcome.pareto)} on the Pareto front\n")
    front = [row.as_dict() for row in outcome.pareto]
    trials = [row.as_dict() for row in outcome.trials]
    print(format_front_table(front, outcome.run_info.to_json(), trials=trials))
    print(f"\nrun directory: {outcome.run_dir}")
    if outcome.report:
        print(f"report:        {outcome.report}")
    if outcome.interrupted:
        print(
            f"\ninterrupted: {outcome.finished + outcome.failed} of {outcome.run_info.num_trials} trials ended; the "
            f"tables are partial. Continue with --resume --name {Path(outcome.run_dir).name}",
            file=sys.stderr,
        )

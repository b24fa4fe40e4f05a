"""`python -m orchestrator`: subcommands over workloads, policies, checkpoints and searches.

Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.cli._dashboard import add_dashboard_arguments, run_dashboard
from orchestrator.cli._export import add_export_arguments, run_export
from orchestrator.cli._format import format_measurements, format_result
from orchestrator.cli._parser import (
    EXIT_CODES,
    CliParser,
    SubcommandParser,
    add_latency_batch_argument,
    add_target_argument,
    add_workload_arguments,
    version_text,
)
from orchestrator.cli._search import add_search_arguments, config_from_args, print_outcome
from orchestrator.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

__all__ = ["build_parser", "main", "search_main"]


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, or cuda[:N]")


def _baseline(args: argparse.Namespace) -> int:
    from orchestrator.device import resolve_device
    from orchestrator.measure import measure_baseline
    from orchestrator.workloads import resolve_workload

    if args.latency_batch_size < 1:
        raise UserError("--latency-batch-size must be at least 1")
    device = resolve_device(args.device)
    workload = resolve_workload(args.workload, data_dir=args.data_dir, weights=args.weights)
    metrics = measure_baseline(workload, device=device, latency_batch_size=args.latency_batch_size, target=args.target)
    print(
        json.dumps(metrics, indent=2) if args.json else f"baseline of {workload.name}\n{format_measurements(metrics)}"
    )
    return 0


def _apply(args: argparse.Namespace) -> int:
    from orchestrator import executor
    from orchestrator.artifacts import store
    from orchestrator.device import resolve_device
    from orchestrator.policy import Policy, check_seed
    from orchestrator.workloads import resolve_workload

    policy = Policy.load(args.policy)
    if args.seed is not None:
        check_seed(args.seed)
    if "://" not in args.out and Path(args.out).exists():
        raise UserError(f"{args.out} already exists; choose a new checkpoint directory")
    device = resolve_device(args.device)
    workload = resolve_workload(args.workload, data_dir=args.data_dir, weights=args.weights)
    result = executor.apply(policy, workload, seed=args.seed, device=device, target=args.target)
    store.save(result.model, policy, result.metrics, workload, args.out)
    print(json.dumps(result.metrics, indent=2) if args.json else format_result(result.metrics, args.out))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from orchestrator.measure import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint,
        workload=args.workload,
        data_dir=args.data_dir,
        weights=args.weights,
        device=args.device,
        target=args.target,
    )
    print(json.dumps(metrics, indent=2) if args.json else format_result(metrics, args.checkpoint))
    return 0


def _report(args: argparse.Namespace) -> int:
    from orchestrator.report import write_report

    paths = write_report(args.run_dir)
    print(f"report:  {paths.html}\nsummary: {paths.summary}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from orchestrator.search.driver import run
    from orchestrator.search.signals import Interrupted

    try:
        outcome = run(config_from_args(args))
    except Interrupted as stop:  # SIGTERM: stopped like Ctrl-C, with its own exit code
        if stop.outcome is None:
            raise
        print_outcome(stop.outcome)
        return stop.exit_code
    print_outcome(outcome)
    return EXIT_INTERRUPTED if outcome.interrupted else 0


def build_parser(*, search_prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of `python -m orchestrator` (`search_prog`: the search's own name, e.g. python search.py)."""
    parser = CliParser(prog="python -m orchestrator", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser)
    _add_measuring_commands(commands)

    search = commands.add_parser(
        "search", help="run a search (the same as python search.py)", epilog=EXIT_CODES, prog=search_prog
    )
    search.add_argument("--version", action="version", version=version_text())
    add_search_arguments(search)
    search.set_defaults(handler=_search)

    export = commands.add_parser(
        "export", help="export a checkpoint to ONNX or torch.export, checked vs PyTorch", epilog=EXIT_CODES
    )
    add_export_arguments(export)
    export.set_defaults(handler=run_export)

    report = commands.add_parser(
        "report", help="(re)write report.html and summary.md of a search run", epilog=EXIT_CODES
    )
    report.add_argument("run_dir", help="the run directory (local path or s3://, gs://)")
    report.set_defaults(handler=_report)

    dashboard = commands.add_parser(
        "dashboard", help="browse a search's trials in optuna-dashboard (optional extra)", epilog=EXIT_CODES
    )
    add_dashboard_arguments(dashboard)
    dashboard.set_defaults(handler=run_dashboard)
    return parser


def _add_measuring_commands(commands: argparse._SubParsersAction) -> None:
    baseline = commands.add_parser(
        "baseline", help="train or load a workload's baseline and measure it", epilog=EXIT_CODES
    )
    _add_workload_args(baseline)
    add_latency_batch_argument(baseline)
    add_target_argument(baseline)
    baseline.add_argument("--json", action="store_true", help="print the measurements as JSON")
    baseline.set_defaults(handler=_baseline)

    apply = commands.add_parser(
        "apply", help="apply a policy to a workload's baseline and save a checkpoint", epilog=EXIT_CODES
    )
    _add_workload_args(apply)
    apply.add_argument("--policy", required=True, metavar="FILE", help="policy JSON file")
    apply.add_argument(
        "--out", required=True, metavar="DIR", help="new checkpoint directory (local path or s3://, gs://)"
    )
    apply.add_argument("--seed", type=int, metavar="N", help="override the policy's seed (default: the policy's own)")
    add_target_argument(apply)
    apply.add_argument("--json", action="store_true", help="print the metrics as JSON")
    apply.set_defaults(handler=_apply)

    evaluate = commands.add_parser(
        "evaluate", help="reload a checkpoint and re-measure it, test split included", epilog=EXIT_CODES
    )
    evaluate.add_argument("checkpoint", help="checkpoint directory (local path or s3://, gs://)")
    evaluate.add_argument("--workload", help="workload (default: the one recorded in the checkpoint, if built in)")
    evaluate.add_argument(
        "--data-dir", metavar="DIR", help="data directory (default: none; cifar10 needs the CIFAR-10 python batches)"
    )
    evaluate.add_argument(
        "--weights", metavar="FILE", help="cifar10: baseline weights as a local safetensors file (default: none)"
    )
    evaluate.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, or cuda[:N]")
    add_target_argument(
        evaluate,
        default=None,
        help="deployment target to re-measure for: torch or onnxruntime (re-exported, timed in an ONNX Runtime "
        "session beside the baseline's) (default: the one the checkpoint's metrics record, else torch)",
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.set_defaults(handler=_evaluate)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; user errors become one line on stderr and exit code 2."""
    return _run(build_parser(), argv)


def search_main(argv: Sequence[str] | None = None) -> int:
    """`python search.py`: the `search` subcommand of `python -m orchestrator`."""
    arguments = ["search", *(sys.argv[1:] if argv is None else argv)]
    return _run(build_parser(search_prog="python search.py"), arguments)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: no space left on the device{where}; free space and run the command again", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (signals.Interrupted: exit 143)
        print(f"interrupted{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)

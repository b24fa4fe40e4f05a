"""`python -m orchestrator`: subcommands over workloads, policies, checkpoints and searches.

Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from orchestrator.errors import UserError

EXIT_USER_ERROR = 2


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="digits", help="digits, cifar10, or package.module:function")
    parser.add_argument("--data-dir", help="data directory (cifar10: the CIFAR-10 python batches)")
    parser.add_argument("--weights", help="cifar10: baseline weights as a local safetensors file")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, or cuda[:N]")


def _baseline(args: argparse.Namespace) -> int:
    from orchestrator.baseline import format_measurements, measure_baseline
    from orchestrator.device import resolve_device
    from orchestrator.workloads import resolve_workload

    if args.latency_batch_size < 1:
        raise UserError("--latency-batch-size must be at least 1")
    device = resolve_device(args.device)
    workload = resolve_workload(args.workload, data_dir=args.data_dir, weights=args.weights)
    metrics = measure_baseline(workload, device=device, latency_batch_size=args.latency_batch_size)
    print(json.dumps(metrics, indent=2) if args.json else f"baseline of {workload.name}\n{format_measurements(metrics)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    baseline = commands.add_parser("baseline", help="train or load a workload's baseline and measure it")
    _add_workload_args(baseline)
    baseline.add_argument("--latency-batch-size", type=int, default=1)
    baseline.add_argument("--json", action="store_true", help="print the measurements as JSON")
    baseline.set_defaults(handler=_baseline)
    return parser




def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; user errors become one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

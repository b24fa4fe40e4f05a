"""The argument parsers: help that shows every default, usage errors with a "did you mean", --version."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable
from importlib import metadata
from typing import Any, NoReturn

from orchestrator.measure.targets import TARGETS
from orchestrator.search.config import DEFAULTS

DISTRIBUTION = "compression-orchestrator"
EXIT_CODES = """\
exit codes:
  0    success
  1    unexpected internal error (a bug: please report it)
  2    bad input or a condition you can fix (one `error:` line)
  130  interrupted (Ctrl-C; a search is resumable with --resume)
  143  stopped by SIGTERM (as by Ctrl-C: resumable with --resume)"""
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # a value, not an option (argparse's own test)
Arguments = argparse.ArgumentParser | argparse._ArgumentGroup  # what takes add_argument: a parser or a help section


def add_workload_arguments(parser: Arguments) -> None:
    """--workload, --data-dir, --weights: which workload, as every subcommand that builds one takes them."""
    parser.add_argument(
        "--workload", default=DEFAULTS["workload"], help="digits, cifar10, text, lm, or package.module:function"
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="data directory (default: none; cifar10 needs the CIFAR-10 python batches)"
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="cifar10: baseline weights as a local safetensors file (default: none: trained and cached)",
    )


def add_target_argument(parser: Arguments, *, default: str | None = DEFAULTS["target"], help: str = "") -> None:
    """--target: the runtime a model's size and latency are measured for."""
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default=default,
        help=help
        or "deployment target: size is the bytes of its artifact (the checkpoint, or the ONNX file) and latency "
        "is timed in that runtime (PyTorch, or an ONNX Runtime CPU session with the same threads)",
    )


def add_latency_batch_argument(parser: Arguments) -> None:
    """--latency-batch-size: the batch the latency measurements time."""
    parser.add_argument(
        "--latency-batch-size",
        type=int,
        default=DEFAULTS["latency_batch_size"],
        metavar="N",
        help="batch size of the latency measurements",
    )


def version_text() -> str:
    """`compression-orchestrator X.Y.Z`, from the installed distribution's metadata."""
    try:
        return f"{DISTRIBUTION} {metadata.version(DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        return f"{DISTRIBUTION} (version unknown: not installed; pip install -e .)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default: `(default: X)`, `(default: off)` for a flag, `(required)`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if "default:" in text or "%(default)" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:
            return f"{text} (default: off)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


class CliParser(argparse.ArgumentParser):
    """A usage error prints this parser's usage and one `error:` line, with a "did you mean" when it can."""

    scans_past_positionals = False  # the top level: options after the subcommand belong to the subcommand

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._arguments: list[str] = []

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        self._arguments = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._arguments, namespace)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.misspelled_option() or message}\n")

    def misspelled_option(self) -> str | None:
        """`unrecognized argument --x: did you mean --y?` for the first unknown option close to a known one."""
        known = list(self._option_string_actions)
        for argument in self._arguments:
            if argument == "--" or not (argument.startswith("-") or self.scans_past_positionals):
                break
            name = argument.split("=", 1)[0]
            if not name.startswith("-") or name == "-" or _NEGATIVE_NUMBER.match(name) or _is_known(name, known):
                continue
            close = difflib.get_close_matches(name, known, n=1)
            if close:
                return f"unrecognized argument {name}: did you mean {close[0]}?"
        return None

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """An invalid choice (a subcommand, a --sampler) names the closest valid one."""
        if action.choices is None or value in action.choices:
            return
        choices = [str(choice) for choice in action.choices]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {', '.join(choices)}){hint}")


class SubcommandParser(CliParser):
    """A subcommand's parser: an unknown argument is its own usage error, not the top level's."""

    scans_past_positionals = True

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _is_known(name: str, known: list[str]) -> bool:
    """An option string, or an unambiguous-enough abbreviation of a long one (argparse accepts those)."""
    return name in known or (name.startswith("--") and any(option.startswith(name) for option in known))

"""Workloads: the built-in ones by name, or a user's own as `package.module:function`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.workloads._unused import unused_layers
from orchestrator.workloads._workload import METRIC_DIRECTIONS, SPLITS, Workload, accuracy
from orchestrator.workloads.data import LoaderSplit, Split, split_of

__all__ = [
    "BUILTIN",
    "METRIC_DIRECTIONS",
    "SPLITS",
    "LoaderSplit",
    "Split",
    "Workload",
    "accuracy",
    "resolve_workload",
    "split_of",
    "unused_layers",
]

BUILTIN = ("digits", "cifar10", "text", "lm")


def resolve_workload(spec: str, *, data_dir: str | Path | None = None, weights: str | Path | None = None) -> Workload:
    """The workload named `spec`: "digits", "cifar10" (needs `data_dir`), "text", "lm", or "pkg.module:function".

    A user's function is called with no arguments, or with `data_dir=` when one is given, and must
    return a Workload.
    """
    if spec == "digits":
        from orchestrator.workloads.digits import make_digits

        return make_digits()
    if spec == "text":
        from orchestrator.workloads.text import make_text

        return make_text()
    if spec == "lm":
        from orchestrator.workloads.lm import make_lm

        return make_lm()
    if spec == "cifar10":
        from orchestrator.workloads.cifar10 import make_cifar10

        if data_dir is None:
            raise UserError("the cifar10 workload needs --data-dir pointing at the CIFAR-10 python batches")
        return make_cifar10(data_dir, weights=weights)
    if ":" not in spec:
        raise UserError(f"unknown workload {spec!r}: use one of {', '.join(BUILTIN)} or package.module:function")
    factory = _import_factory(spec)
    try:
        workload = factory(data_dir=str(data_dir)) if data_dir is not None else factory()
    except UserError:
        raise
    except (Exception, SystemExit) as exc:  # the user's code; KeyboardInterrupt still stops the run
        raise UserError(f"workload function {spec!r} failed: {_describe(exc)}") from None
    if not isinstance(workload, Workload):
        raise UserError(f"{spec} returned {type(workload).__name__}, not an orchestrator Workload")
    return workload


def _import_factory(spec: str) -> Callable[..., Workload]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or module_name.startswith("."):
        raise UserError(f"bad workload {spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(
            f"cannot import workload module {module_name!r}: {_first_line(exc) or _describe(exc)}"
        ) from None
    except (Exception, SystemExit) as exc:  # raised, sys.exit() or a SyntaxError at import time
        raise UserError(f"workload module {module_name!r} failed to import: {_describe(exc)}") from None
    try:
        factory = getattr(module, attr, None)
    except Exception as exc:  # a module-level __getattr__ that raises something else than AttributeError
        raise UserError(f"looking up {spec!r} failed: {_describe(exc)}") from None
    if not callable(factory):
        raise UserError(f"module {module_name!r} has no callable {attr!r}")
    return factory


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message ("" when it has none)."""
    try:
        text = str(exc)
    except Exception:  # a hostile __str__
        return ""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _describe(exc: BaseException) -> str:
    """`Type: first line of the message`, or just `Type` when there is no message."""
    message = _first_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__

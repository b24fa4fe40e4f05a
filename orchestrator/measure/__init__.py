"""Everything that measures a model: paired timing, deployment targets, size, the reference, re-measuring.

    measured = measure(model, inputs, base=base, beside=baseline)    # a `Measurements` record
    measured.metrics(reference)                                      # its flat, JSON-safe form

Modules, one job each: `timing` (forward passes timed alone or paired with a baseline: `time_latency`,
`time_paired`, `Speedup`), `size` (artifact bytes, parameters, FLOPs), `measurements` (the `Measurements` record
and `measure`, which builds it), `targets` (torch or an ONNX Runtime session), `reference` (the baseline measured
once; a model's scores and measurements against it) and `evaluate` (re-measuring a baseline or a saved
checkpoint). The executor applies policies and calls these; nothing here applies a policy. Names load lazily (as
`orchestrator.export`'s do), so the command line can import a constant without loading the checkpoint store and
the packed format.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.measure.evaluate import against_recorded, evaluate_checkpoint, measure_baseline
    from orchestrator.measure.measurements import Environment, Measurements, measure
    from orchestrator.measure.reference import (
        Reference,
        compressed_metrics,
        measure_on,
        measure_reference,
        preview_metrics,
        scores,
    )
    from orchestrator.measure.size import count_flops, count_weights, measure_artifact
    from orchestrator.measure.targets import (
        DEFAULT_TARGET,
        TARGETS,
        OnnxSession,
        TargetError,
        check_target,
        deploy,
        onnx_session,
    )
    from orchestrator.measure.timing import (
        MIN_BLOCK_S,
        REPRODUCIBILITY,
        Clock,
        Deployed,
        Latency,
        Speedup,
        Timed,
        time_latency,
        time_paired,
        torch_threads,
    )

# the submodules a name is looked up in, lightest first (a constant of `targets` loads neither store nor finalize)
_MODULES = ("timing", "targets", "size", "measurements", "reference", "evaluate")
__all__ = [
    "DEFAULT_TARGET",
    "MIN_BLOCK_S",
    "REPRODUCIBILITY",
    "TARGETS",
    "Clock",
    "Deployed",
    "Environment",
    "Latency",
    "Measurements",
    "OnnxSession",
    "Reference",
    "Speedup",
    "TargetError",
    "Timed",
    "against_recorded",
    "check_target",
    "compressed_metrics",
    "count_flops",
    "count_weights",
    "deploy",
    "evaluate_checkpoint",
    "measure",
    "measure_artifact",
    "measure_baseline",
    "measure_on",
    "measure_reference",
    "onnx_session",
    "preview_metrics",
    "scores",
    "time_latency",
    "time_paired",
    "torch_threads",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _MODULES:
            found = vars(importlib.import_module(f"orchestrator.measure.{module}"))
            if name in found:
                globals()[name] = found[name]
                return found[name]
    raise AttributeError(f"module 'orchestrator.measure' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

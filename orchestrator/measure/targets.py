"""Deployment targets: the runtime a model's size and latency are measured in (`torch` or `onnxruntime`).

`torch` (the default): size is the checkpoint's deployable files, latency the PyTorch model's. `onnxruntime`:
size is the ONNX file the exporter writes for the model, latency an ONNX Runtime session's on the same inputs
(as numpy), so a user shipping ONNX optimises what they ship.

Decisions:
- The session runs on CPUExecutionProvider with `intra_op_num_threads` = torch's thread count when it is made
  (the trial's), one inter-op thread, every graph optimisation but `SkipLayerNormFusion`; it is timed by
  `measure` like a module. That fusion made transformers slower than the nodes it replaces on the CPUs measured
  (docs/BENCHMARKS.md), so every ONNX model measured here, baselines and comparisons included, runs without it
  (`SESSION_DISABLED_OPTIMIZERS`).
- The ONNX file is the exporter's own (`orchestrator.export.export_model`) with `int8_activations` (ONNX
  Runtime quantises the activations of 8-bit Linear layers with its fused dynamic kernel, and 2-4-bit ones in
  MatMulNBits: the fast kernels a user deploying to ORT gets). An export that cannot be made is a
  `TargetError`; one that differs from PyTorch beyond the tolerance is not: the deployed artifact is what is
  scored (`OnnxSession.evaluate`: the workload's metric over a split, batched as PyTorch evaluation batches it,
  the session's flat outputs put back in the structure the model returns and reduced by the workload's
  `output_fn`), and the check's difference is kept (`check_metrics`) as a measurement beside the PyTorch score.
  The exporter is imported where it is used: it loads onnx (seconds), which the torch target never needs.
- A session pickles as its file's bytes and thread count and is rebuilt on load, so a record holding one can
  cross a process boundary.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.errors import UserError
from orchestrator.workloads import Workload
from techniques.tools.inputs import Inputs, call_model, tensors

TARGETS = ("torch", "onnxruntime")
SESSION_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)  # slower than what it replaces (see Decisions)
DEFAULT_TARGET = "torch"


class TargetError(UserError):
    """A model cannot be deployed to the target (its export fails, or fails its check against PyTorch)."""


def check_target(target: str) -> str:
    """`target` if it is a known deployment target, else a UserError naming the choices."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return target


@dataclass
class OnnxSession:
    """An ONNX file in an ONNX Runtime CPU session: what the `onnxruntime` target weighs (`size_bytes`, the
    file's bytes), times (`bind(inputs)`: one forward on fixed inputs) and scores (`evaluate`); `structure` is the
    PyTorch model's output structure (tensors emptied, `export._check.structure_of`) its outputs are put back in,
    `check` the export check's result (`export._check.compare`)."""

    data: bytes = field(repr=False)
    threads: int
    target: str = "onnxruntime"
    structure: Any = field(default=None, repr=False, compare=False)
    check: dict[str, Any] = field(default_factory=dict, compare=False)
    session: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.session is None:
            self.session = _session(self.data, self.threads)

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    @property
    def runtime(self) -> str:
        return f"onnxruntime {metadata.version('onnxruntime')} (CPUExecutionProvider)"

    def feeds(self, inputs: Inputs) -> dict[str, Any]:
        """The graph's inputs from a batch (a dict by name, else in order) as numpy arrays on the CPU."""
        names = [value.name for value in self.session.get_inputs()]
        if isinstance(inputs, Mapping):
            missing = [name for name in names if name not in inputs]
            if missing:
                raise TargetError(f"the ONNX graph takes input(s) {missing} that the workload's batches lack")
            given = [inputs[name] for name in names]
        else:
            given = tensors(inputs)
            if len(given) != len(names):
                raise TargetError(f"the ONNX graph takes {len(names)} input(s), the workload's batches {len(given)}")
        return {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, given, strict=True)}

    def bind(self, inputs: Inputs) -> Callable[[], object]:
        """One forward pass on `inputs` (converted once, so only the session is timed)."""
        feeds = self.feeds(inputs)
        run = self.session.run
        return lambda: run(None, feeds)

    def outputs(self, inputs: Inputs) -> Any:
        """The session's outputs on a batch as torch tensors, in the structure the PyTorch model returns them
        (a flat list when that is unknown)."""
        from orchestrator.export import with_tensors

        feeds = self.feeds(inputs)
        try:
            arrays = [torch.from_numpy(array) for array in self.session.run(None, feeds)]
        except Exception as exc:  # onnxruntime's own error types (bad dimensions, a kernel failing)
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TargetError(f"ONNX Runtime cannot run the exported model on the workload's batches: {line}") from exc
        if self.structure is None:
            return arrays
        try:
            return with_tensors(self.structure, iter(arrays))
        except StopIteration:
            raise TargetError(f"the ONNX graph returns {len(arrays)} output(s), fewer than the PyTorch model") from None

    def evaluate(self, workload: Workload, split: str = "validation") -> float:
        """The workload's metric of this artifact on a split, as `Workload.evaluate` computes PyTorch's."""
        return workload.score(self.outputs, split, "cpu")

    def check_metrics(self) -> dict[str, Any]:
        """The export check as a trial records it: the largest difference to PyTorch, its bound, whether it held."""
        worst, bound = self.check.get("max_abs_diff"), self.check.get("tolerance")
        return {
            "export_max_abs_diff": worst if isinstance(worst, float) and math.isfinite(worst) else None,
            "export_tolerance": bound,
            "export_check_passed": bool(self.check.get("passed")),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = {"data": self.data, "threads": self.threads, "target": self.target}
        return {**state, "structure": self.structure, "check": self.check}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def _session(data: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        data, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(SESSION_DISABLED_OPTIMIZERS)
    )


def onnx_session(model: nn.Module, workload: Workload) -> OnnxSession:
    """The model exported to ONNX by the project's exporter in a session with torch's current thread count, with
    the export's check against PyTorch on the workload's validation inputs (kept, not enforced: see Decisions)."""
    from orchestrator.export import export_model, structure_of

    with tempfile.TemporaryDirectory(prefix="onnx-target-") as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            result = export_model(model, workload, out=out, format="onnx", int8_activations=True)
        except UserError as exc:
            raise TargetError(f"target onnxruntime: the model cannot be exported: {exc}") from exc
        data = out.read_bytes()
    example = workload.example_inputs(1, next((p.device for p in model.parameters()), "cpu"))
    with torch.inference_mode():
        structure = structure_of(call_model(model.eval(), example))
    return OnnxSession(data, torch.get_num_threads(), structure=structure, check=result.report["check"])


def deploy(model: nn.Module, workload: Workload, target: str) -> OnnxSession | None:
    """The model as `target` runs it, or None for torch (the model itself is what runs)."""
    if check_target(target) == "torch":
        return None
    return onnx_session(model, workload)

"""The check of an exported artifact: run it in its own runtime on real inputs and compare with PyTorch.

Decisions: every output tensor is compared (flattened in order, as torch.export flattens a ModelOutput or a
dict); the tolerance is relative to the largest reference output: TOLERANCE x max(1, max |reference|) covers
float32 reassociation in another runtime's kernels. Where activations are quantised (8-bit static activations
in the checkpoint, or MatMulNBits quantising them on the fly), a float32 difference upstream can move a value
across a rounding boundary, one quantisation step, so the ONNX check is held to QUANTIZED_ACTIVATIONS_TOLERANCE
(measured: a 4-layer BERT with int8 GEMMs differs by 1e-3, its single layers by one float32 ulp). The ONNX file
runs in an ONNX Runtime CPU session built from the bytes that will be written; the torch.export program is
loaded back with `torch.export.load`.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator, Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from orchestrator.errors import UserError
from techniques.tools.inputs import Inputs, call_model, output_tensors, tensors

TOLERANCE = 1e-4  # of max(1, largest |reference output|), for exports computing in float32
QUANTIZED_ACTIVATIONS_TOLERANCE = 1e-2  # the same, where an exported graph quantises activations


class CheckError(UserError):
    """The exported artifact cannot be run on the workload's inputs."""


def reference_outputs(model: nn.Module, inputs: Inputs) -> list[np.ndarray]:
    """The PyTorch model's output tensors on `inputs`, in order, as float arrays."""
    with torch.no_grad():
        return [t.detach().float().cpu().numpy() for t in output_tensors(call_model(model, inputs))]


def onnx_outputs(data: bytes, inputs: Inputs) -> list[np.ndarray]:
    """Run an ONNX file (bytes) in an ONNX Runtime CPU session on `inputs`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    if isinstance(inputs, Mapping):
        missing = [name for name in names if name not in inputs]
        if missing:
            raise CheckError(f"the ONNX graph takes input(s) {missing} that the workload's batches do not have")
        feeds = {name: inputs[name].cpu().numpy() for name in names}
    else:
        given = tensors(inputs)
        if len(given) != len(names):
            raise CheckError(f"the ONNX graph takes {len(names)} input(s), the workload's batches hold {len(given)}")
        feeds = {name: tensor.cpu().numpy() for name, tensor in zip(names, given, strict=True)}
    return [np.asarray(value, dtype=np.float32) for value in session.run(None, feeds)]


def with_tensors(template: Any, values: Iterator[torch.Tensor]) -> Any:
    """`template` (a model's outputs: a tensor, a ModelOutput, a dict, a tuple, nested) with its tensors replaced
    in `output_tensors` order by `values`: an artifact's flat outputs in the structure the PyTorch model returns."""
    if isinstance(template, torch.Tensor):
        return next(values)
    if isinstance(template, Mapping):
        items = {key: with_tensors(value, values) for key, value in template.items()}
        if dataclasses.is_dataclass(template):  # a ModelOutput: its fields by keyword
            return type(template)(**items)
        try:
            return cast(Any, type(template))(items)  # the concrete mapping class (dict, OrderedDict, ...)
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if isinstance(template, tuple | list):
        items_ = [with_tensors(value, values) for value in template]
        return type(template)(*items_) if hasattr(template, "_fields") else type(template)(items_)
    return template


def structure_of(outputs: Any) -> Any:
    """A model's outputs with every tensor emptied: the structure `with_tensors` fills, small enough to keep."""
    return with_tensors(outputs, iter(lambda: torch.empty(0), None))


def program_outputs(data: bytes, inputs: Inputs) -> list[np.ndarray]:
    """Load a torch.export program (bytes of a .pt2 file) and run it on `inputs`."""
    program = torch.export.load(io.BytesIO(data))
    with torch.no_grad():
        return [t.detach().float().numpy() for t in output_tensors(call_model(program.module(), inputs))]


def compare(
    references: list[list[np.ndarray]], exported: list[list[np.ndarray]], tolerance: float, why: str = ""
) -> dict[str, Any]:
    """Max and mean absolute difference over every output of every run, the tolerance (`why` it is what it is)
    it is held to, pass/fail."""
    diffs, largest = [], 1.0
    for reference, outputs in zip(references, exported, strict=True):
        if len(reference) != len(outputs):
            raise CheckError(f"the export returns {len(outputs)} output tensor(s), the PyTorch model {len(reference)}")
        for ref, out in zip(reference, outputs, strict=True):
            if ref.shape != out.shape:
                raise CheckError(f"an exported output has shape {out.shape}, PyTorch's {ref.shape}")
            diffs.append(np.abs(ref - out).reshape(-1))
            largest = max(largest, float(np.abs(ref).max(initial=0.0)))
    every = np.concatenate(diffs) if diffs else np.zeros(1)
    bound = tolerance * largest
    worst = float(every.max())
    return {
        "max_abs_diff": worst,
        "mean_abs_diff": float(every.mean()),
        "max_abs_reference": largest,
        "tolerance": bound,
        "tolerance_rule": f"{tolerance:g} x max(1, max |reference output|){why}",
        "passed": bool(np.isfinite(worst) and worst <= bound),
    }

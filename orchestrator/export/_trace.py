"""How a model is called while it is traced for export: arguments, the dynamic batch axis, one error type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.errors import UserError
from techniques.tools.inputs import Inputs, tensors


class ExportError(UserError):
    """The model cannot be exported (its forward does not trace, or the exporter refused it)."""


def call_arguments(inputs: Inputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(args, kwargs) calling a model on a batch, as `call_model` does: a dict batch becomes keyword tensors."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(tensors(inputs)), {}


def dynamic_batch(inputs: Inputs) -> Any:
    """torch.export dynamic shapes marking dim 0 of every input as one `batch` axis (shaped like the call)."""
    batch = torch.export.Dim("batch")

    def spec(tensor: torch.Tensor) -> dict[int, Any] | None:
        return {0: batch} if tensor.dim() else None

    if isinstance(inputs, torch.Tensor):
        return (spec(inputs),)
    if isinstance(inputs, Mapping):
        return {key: spec(value) for key, value in inputs.items()}
    return tuple(spec(value) for value in tensors(inputs))


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class Written:
    """An exported artifact in memory: its bytes, one report entry per packed layer, its input and output names,
    and the runtime that runs it."""

    data: bytes
    layers: list[dict[str, Any]]
    inputs: list[str]
    outputs: list[str]
    runtime: str


def output_names(outputs: Any, prefix: str = "") -> list[str]:
    """Names for the tensors of a (nested) model output, in `output_tensors` order: `output` for a tensor, the
    keys of a dict or ModelOutput (`logits`), `output_0`, ... for a tuple."""
    if isinstance(outputs, torch.Tensor):
        return [prefix or "output"]
    if isinstance(outputs, Mapping):
        return [n for k, v in outputs.items() for n in output_names(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(outputs, tuple | list):
        base = prefix or "output"
        return [n for i, v in enumerate(outputs) for n in output_names(v, f"{base}_{i}")]
    return []

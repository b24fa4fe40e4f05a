"""Torch-Pruning's dependency graph of a model traced on the context's example inputs (tensor, tuple or dict),
and the check that a structural cut left the model running with the same output shapes. Shared by the structured
pruning techniques (heads, channels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from techniques._base import Context
from techniques.tools.inputs import Inputs, call_model, output_tensors, to_device


@dataclass
class Traced:
    """A dependency graph traced on example inputs, with what the model returned for them."""

    graph: Any
    example: Inputs
    output_fns: set[Any]  # grad_fns of the output tensors: the nodes whose channels are the model's output
    shapes: list[torch.Size]


def trace(model: nn.Module, ctx: Context) -> Traced:
    """Torch-Pruning's dependency graph of `model` on the context's example inputs (tensor, tuple or dict)."""
    import torch_pruning as tp

    parameter = next(model.parameters(), None)
    example = to_device(ctx.example_inputs, parameter.device if parameter is not None else ctx.device)
    outputs: list[torch.Tensor] = []

    def forward(module: nn.Module, inputs: Inputs) -> Any:
        found = list(output_tensors(call_model(module, inputs)))
        outputs.extend(found)
        return found  # the tensors alone: Torch-Pruning cannot walk a ModelOutput holding a key/value cache

    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=forward)
    output_fns = {t.grad_fn for t in outputs if t.grad_fn is not None}
    return Traced(graph, example, output_fns, [t.shape for t in outputs])


def check_outputs(model: nn.Module, traced: Traced, technique: str) -> None:
    """Raise RuntimeError unless the pruned model still runs on the example and returns the same shapes."""
    try:
        with torch.no_grad():
            shapes = [t.shape for t in output_tensors(call_model(model, traced.example))]
    except (RuntimeError, ValueError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(f"{technique}: the pruned model no longer runs ({reason}); not supported") from None
    if shapes != traced.shapes:
        raise RuntimeError(f"{technique}: pruning changed the model's output shapes; this graph is not supported")

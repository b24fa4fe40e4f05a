"""Model inputs and outputs as models have them.

A batch of inputs is a tensor (`model(x)`), a tuple or list of tensors (`model(*x)`), or a mapping of
names to tensors (`model(**x)`, as Hugging Face models take it); every tensor holds the batch on dim 0.
Outputs may be a tensor, a tuple or a mapping such as a `ModelOutput`; `main_output` picks the tensor that
metrics and losses read, unless a workload names its own reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

Inputs: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | Mapping[str, torch.Tensor]
OutputFn: TypeAlias = Callable[[Any], torch.Tensor]


def tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of a batch, in order; TypeError for anything that is not a tensor, sequence or mapping."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = list(inputs.values()) if isinstance(inputs, Mapping) else inputs
    if not isinstance(values, Sequence) or not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(
            f"model inputs must be a tensor, a tuple of tensors or a dict of tensors, got {_describe(inputs)}"
        )
    return list(values)


def map_tensors(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """The same structure with `fn` applied to every tensor."""
    tensors(inputs)  # checks the structure
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {key: fn(value) for key, value in inputs.items()}
    return tuple(fn(value) for value in inputs)


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    return map_tensors(inputs, lambda t: t.to(device))


def first_rows(inputs: Inputs, count: int) -> Inputs:
    """The first `count` examples of a batch."""
    return map_tensors(inputs, lambda t: t[:count])


def take_rows(inputs: Inputs, index: torch.Tensor) -> Inputs:
    """The examples at `index` (a 1-D index tensor)."""
    return map_tensors(inputs, lambda t: t[index])


def batch_length(inputs: Inputs) -> int:
    """How many examples the batch holds (dim 0 of its tensors; ValueError when they disagree)."""
    lengths = {len(t) if t.dim() else 1 for t in tensors(inputs)}
    if len(lengths) != 1:
        raise ValueError(f"the input tensors of a batch hold different numbers of examples: {sorted(lengths)}")
    return lengths.pop()


def device_of(inputs: Inputs) -> torch.device:
    return tensors(inputs)[0].device


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """`model(x)`, `model(*x)` or `model(**x)`, by the structure of the batch."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def main_output(outputs: Any) -> torch.Tensor:
    """The tensor metrics read: a tensor itself; `logits` (else the first tensor) of a mapping or ModelOutput;
    the first element of a tuple or list."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if isinstance(outputs.get("logits"), torch.Tensor):
            return outputs["logits"]
        values = list(outputs.values())
    elif isinstance(outputs, tuple | list):
        values = list(outputs)
    else:
        values = []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find an output tensor in {_describe(outputs)}; give the workload an output_fn")


def output_tensors(outputs: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) output structure, in order."""
    if isinstance(outputs, torch.Tensor):
        yield outputs
    elif isinstance(outputs, Mapping):
        for value in outputs.values():
            yield from output_tensors(value)
    elif isinstance(outputs, tuple | list):
        for value in outputs:
            yield from output_tensors(value)


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} of {', '.join(f'{k}: {type(v).__name__}' for k, v in value.items())}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {', '.join(type(v).__name__ for v in value)}"
    return type(value).__name__

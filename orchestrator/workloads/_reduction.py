"""A workload's output reduction: what the model returns (and, when asked, the batch) → the tensor metrics read.

    def mean_pooled(outputs, batch):  # sentence-transformers' pooling: mean over the tokens the mask keeps
        mask = batch["attention_mask"].unsqueeze(-1).to(outputs.last_hidden_state.dtype)
        return (outputs.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

Decisions:
- An `output_fn` takes `(outputs)` or `(outputs, batch)`; the batch (the model's inputs, as the model was
  called with them) is passed when the function's second positional parameter has no default. That keeps every
  one-argument reduction (and `main_output`) as it was, and lets a reduction read what only the inputs hold, as
  the attention mask of mean pooling (sentence-transformers' `Pooling`); a wrapper module computing the pooled
  embedding in its forward is the other route, but then the exported model is the wrapper, not the encoder.
- The signature is read once, when the workload is made; any other shape is one UserError line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeAlias

import torch

from orchestrator.errors import UserError
from techniques.tools.inputs import Inputs

OutputFn: TypeAlias = Callable[..., torch.Tensor]  # (outputs) -> tensor, or (outputs, batch) -> tensor
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def takes_batch(output_fn: OutputFn) -> bool:
    """Whether `output_fn` is called as `(outputs, batch)` (True) or `(outputs)` (False); UserError for a
    function that can be called neither way."""
    if not callable(output_fn):
        raise UserError(f"output_fn must be a function (outputs) or (outputs, batch), got {type(output_fn).__name__}")
    try:
        signature = inspect.signature(output_fn)
    except (TypeError, ValueError):  # a builtin or C callable without a signature: called with the outputs alone
        return False
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in _POSITIONAL]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only or len(required) > 2 or (not positional and not varargs):
        name = getattr(output_fn, "__name__", type(output_fn).__name__)
        raise UserError(
            f"output_fn {name}{signature} must take (outputs) or (outputs, batch): the model's outputs, and "
            "optionally the batch of inputs the model was called with"
        )
    return len(required) == 2


def reduce_output(output_fn: OutputFn, outputs: Any, inputs: Inputs, *, with_batch: bool | None = None) -> torch.Tensor:
    """`output_fn(outputs, inputs)` or `output_fn(outputs)`, as its signature asks (`with_batch`: already read)."""
    if with_batch is None:
        with_batch = takes_batch(output_fn)
    return output_fn(outputs, inputs) if with_batch else output_fn(outputs)

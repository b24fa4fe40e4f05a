"""What a model weighs: the bytes of its deployable artifact on disk, its parameters (and non-zeros) and FLOPs.

Decisions: size is never a formula: `measure_artifact` writes the artifact (`store.write_artifact`, the files a
checkpoint ships) to a temporary directory and counts its bytes; the store writes artifacts, this module sizes
them. Parameters of packed layers are counted by their logical (dense) weights; FLOPs are counted on one row of
inputs with torch's counter, integer GEMMs included.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from orchestrator.artifacts.store import write_artifact
from techniques.tools.inputs import Inputs, call_model


def measure_artifact(model: nn.Module, base: nn.Module | None = None) -> int:
    """The model's size: bytes on disk of its deployable artifact, by writing it to a temporary directory.

    The one definition of size in the project; checkpoints, trials and the baseline all use it. `base` is
    the architecture the structure record is written against (None: the model's own, an empty record).
    """
    with tempfile.TemporaryDirectory(prefix="artifact-") as tmp:
        return write_artifact(model, model if base is None else base, Path(tmp))


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the model as it is, packed layers counted by their logical weights."""
    total = nonzero = 0
    for module in model.modules():
        tensors = [p for _, p in module.named_parameters(recurse=False)]
        if hasattr(module, "dense_weight"):
            tensors = [cast(Any, module).dense_weight()] + [b for b in [getattr(module, "bias", None)] if b is not None]
        for tensor in tensors:
            total += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor.detach()).item())
    return total, nonzero


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(model: nn.Module, example_inputs: Inputs) -> int:
    """Floating-point operations of one forward pass on `example_inputs` (a multiply-add counts as 2)."""
    model.eval()
    # Integer GEMMs (torch._int_mm) are multiply-adds too; the stock counter does not know them.
    custom = {torch.ops.aten._int_mm: _int_mm_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        call_model(model, example_inputs)
    return int(counter.get_total_flops())

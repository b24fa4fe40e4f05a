"""The torch.export writer: an ExportedProgram (.pt2) that keeps the packed buffers and decodes in its graph.

Decisions: a copy of the model has every packed layer's `forward` swapped for its `export_forward` (the same
arithmetic, decoding from the packed buffers on every call) and its decode caches dropped, so the program
stores b-bit codes, masks and scales rather than float32 weights; the int8 kernel stays `torch._int_mm`.
Stack traces (absolute paths of this machine) are stripped from the graph before saving.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import torch
from torch import nn

from orchestrator.export._trace import (
    ExportError,
    Written,
    call_arguments,
    dynamic_batch,
    first_line,
    output_names,
)
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.layers import INT_KERNEL, PackedLayer
from techniques.tools.inputs import Inputs, call_model

DECODED = "no low-bit kernel: decoded to fp32 in the graph on every call"


def _record(module: PackedLayer | PackedEmbedding) -> dict[str, Any]:
    """The report entry of one packed layer in the program."""
    weight = module.decode_weight() if isinstance(module, PackedLayer) else module.dense_weight()
    sparsity = round(float((weight == 0).float().mean()), 4)
    notes = []
    if isinstance(module, PackedEmbedding):
        op, kernel = "index_select", "gathers packed rows and decodes only those to fp32, on every call"
    elif module.kernel == INT_KERNEL:
        op, kernel = "aten._int_mm", "torch._int_mm (int8 x int8 -> int32); codes unpacked in the graph"
    else:
        op, kernel = ("linear" if weight.dim() == 2 else "conv2d"), DECODED
    if isinstance(module, PackedLayer) and module.sparse:
        notes.append(f"{sparsity:.0%} zero weights stored sparse (mask + kept values), scattered dense on every call")
    return {"bits": module.bits, "op": op, "stored_bits": module.bits, "kernel": kernel,
            "low_bit_kernel": op == "aten._int_mm", "sparsity": sparsity, "notes": notes}  # fmt: skip


def export_program(model: nn.Module, inputs: Inputs) -> Written:
    """The bytes of a torch.export program of `model` (dim 0 of every input dynamic) and its layers' entries."""
    prepared = copy.deepcopy(model).cpu().eval()
    records = []
    for name, module in prepared.named_modules():
        if isinstance(module, PackedLayer | PackedEmbedding):
            if isinstance(module, PackedLayer):
                module.drop_caches()
            module.forward = module.export_forward  # type: ignore[method-assign,assignment]
            records.append({"name": name or "model", "type": type(module).__name__, **_record(module)})
    args, kwargs = call_arguments(inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(prepared, args, kwargs, dynamic_shapes=dynamic_batch(inputs))
    except Exception as exc:  # torch.export's error types vary between releases
        raise ExportError(f"torch.export cannot export this model: {first_line(exc)}") from exc
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return Written(
        data=buffer.getvalue(),
        layers=records,
        inputs=list(program.graph_signature.user_inputs),
        outputs=_names(prepared, inputs),
        runtime=f"torch {torch.__version__} (torch.export.load(...).module())",
    )


def _names(model: nn.Module, inputs: Inputs) -> list[str]:
    with torch.no_grad():
        return output_names(call_model(model, inputs))

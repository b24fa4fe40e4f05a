"""Export a checkpoint for deployment without this project: an ONNX file, a torch.export program, or (for a
transformers decoder LM) a Hugging Face model directory.

    result = orchestrator.export_checkpoint("ckpt/", format="onnx", out="model.onnx")
    result.path, result.bytes, result.report["check"]["max_abs_diff"]

The artifact keeps the compression (low-bit weights stay low-bit, pruned and factored layers keep their smaller
shapes; the hf directory keeps the pruned shapes and holds low-bit weights dequantized, with a note), says per
layer which operator and kernel runs it and where the runtime has no low-bit kernel, and is checked against the
PyTorch model on the workload's validation inputs before it is written; the report is written beside it as JSON.
Modules: `_markers` + `_onnx` + `_onnx_layers` (ONNX), `_program` (torch.export), `hf` (transformers directory),
`_check` (running and comparing), `_run` (the public functions). Names load lazily: `import orchestrator.export`
does not import torch or onnx.
"""

from __future__ import annotations

import importlib
from typing import Any

FORMATS = ("onnx", "torch-export", "hf")

_EXPORTS = {
    "ExportError": "orchestrator.export._trace",
    "ExportResult": "orchestrator.export._run",
    "export_checkpoint": "orchestrator.export._run",
    "export_model": "orchestrator.export._run",
    "structure_of": "orchestrator.export._check",
    "with_tensors": "orchestrator.export._check",
}
__all__ = sorted([*_EXPORTS, "FORMATS"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orchestrator.export' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

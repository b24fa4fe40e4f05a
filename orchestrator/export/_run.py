"""`export_checkpoint` / `export_model`: write the artifact and its report after checking it against PyTorch.

Decisions:
- The artifact is traced on TRACE_BATCH validation examples with a dynamic batch axis, then run in its own
  runtime at batch sizes CHECK_BATCH and 1 and compared with the PyTorch model (every output tensor); only then
  are the artifact and the JSON report written, each atomically (temporary name, then a move), to a local path
  or a pyarrow URI. A check that fails still writes both (the report says `passed: false`), for inspection.
- An existing `out` or report, or one in a directory this machine cannot write, is refused before any work; so
  is an unknown format. The report is written after the artifact, and an artifact whose report cannot be written
  is removed: an artifact is never left without its report.
- The report lists every Linear/Conv2d/Embedding in model order with its weight shape (pruned and factored
  layers show their smaller shapes), the operator and kernel that runs it, the bits it is stored in, its
  fraction of zero weights, and notes (widened codes, no low-bit kernel, sparse layers run dense). Layers the
  model's outputs never depend on (`Workload.unused_layers`: BERT's pooler under a module that reads only hidden
  states) are not in the exported graph: they are listed once, as `unused_layers`, and nowhere else.
- `format="hf"` writes a directory instead (orchestrator.export.hf: a transformers causal LM, checked by loading it
  with `from_pretrained` and comparing logits and greedy tokens); the report beside it is `OUT.json` as for files.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from torch import nn

from orchestrator.artifacts import store
from orchestrator.errors import UserError
from orchestrator.export import FORMATS
from orchestrator.export._check import (
    QUANTIZED_ACTIVATIONS_TOLERANCE,
    TOLERANCE,
    compare,
    onnx_outputs,
    program_outputs,
    reference_outputs,
)
from orchestrator.export._onnx import export_onnx
from orchestrator.export._onnx_layers import SPARSITY_NOTE
from orchestrator.export._program import export_program
from orchestrator.export._trace import ExportError, Written
from orchestrator.files.fs import is_uri, resolve, write_atomic, write_problem
from orchestrator.workloads import Workload, resolve_workload, unused_layers
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.layers import PackedLayer
from techniques.tools.inputs import batch_length

TRACE_BATCH = 2
CHECK_BATCH = 8


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the artifact's path and bytes, and the report (also written as JSON at
    `report_path`)."""

    path: str
    bytes: int
    report: dict[str, Any]
    report_path: str

    @property
    def passed(self) -> bool:
        """Whether the artifact's outputs matched the PyTorch model's within the recorded tolerance."""
        return bool(self.report["check"]["passed"])


def export_checkpoint(
    checkpoint: str | Path,
    *,
    out: str | Path,
    format: str = "onnx",
    workload: Workload | str | None = None,
    report: str | Path | None = None,
    int8_activations: bool = False,
    compressed_tensors: bool = False,
    data_dir: str | None = None,
    weights: str | None = None,
) -> ExportResult:
    """Export a checkpoint to `out` as ONNX ("onnx"), a torch.export program ("torch-export") or a Hugging Face
    model directory ("hf", transformers causal LMs), checked against the PyTorch model; the report goes to `report`
    (default: `OUT.json`).

    `workload` defaults to the built-in one the checkpoint names (pass yours, or `package.module:function`);
    `int8_activations` lets ONNX Runtime quantise activations its own way (DynamicQuantizeMatMul for 8-bit
    Linear layers, MatMulNBits at accuracy level 4 for 2-4-bit ones: faster; the check's tolerance is then
    QUANTIZED_ACTIVATIONS_TOLERANCE, as for checkpoints with 8-bit activations); `compressed_tensors` (hf) keeps
    low-bit Linear weights packed in compressed-tensors' pack-quantized format. Bad input (unknown format, existing
    `out`, missing or damaged checkpoint) raises UserError.
    """
    options = _Options(int8_activations, compressed_tensors)
    paths = _destination(format, str(out), report, options)
    verified = store.read_verified(str(checkpoint))
    if not isinstance(workload, Workload):
        name = workload or store.recorded_workload(verified.manifest)
        workload = resolve_workload(name, data_dir=data_dir, weights=weights)
    loaded = store.load_verified(verified, workload)
    manifest = verified.manifest
    source = {
        "checkpoint": str(checkpoint),
        "checkpoint_bytes": sum(manifest["files"][name]["bytes"] for name in manifest["artifact_files"]),
        "techniques": loaded.policy.techniques(),
    }
    return _export(loaded.model, workload, format, paths, options, source)


def export_model(
    model: nn.Module,
    workload: Workload,
    *,
    out: str | Path,
    format: str = "onnx",
    report: str | Path | None = None,
    int8_activations: bool = False,
    compressed_tensors: bool = False,
) -> ExportResult:
    """Export a model in memory (a finalized compressed model, or an uncompressed baseline) of `workload`, as
    `export_checkpoint` does."""
    options = _Options(int8_activations, compressed_tensors)
    paths = _destination(format, str(out), report, options)
    return _export(model, workload, format, paths, options, {"model": type(model).__name__})


@dataclass(frozen=True)
class _Options:
    """The format-specific switches of one export."""

    int8_activations: bool = False
    compressed_tensors: bool = False


def _destination(format: str, out: str, report: str | Path | None, options: _Options) -> tuple[str, str]:
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if options.int8_activations and format != "onnx":
        raise UserError("int8 activations (--int8-activations) are an ONNX Runtime option; use --format onnx")
    if options.compressed_tensors and format != "hf":
        raise UserError("--compressed-tensors is a Hugging Face directory option; use --format hf")
    if format == "hf" and len(out) > 1:
        out = out.rstrip("/")  # a directory named with a trailing slash: its report goes beside it, not inside
    report_path = str(report) if report is not None else f"{out}.json"
    if report_path == out:
        raise UserError(f"--report {report_path} is the --out path; give the report a path of its own")
    for flag, path in (("--out", out), ("--report", report_path)):
        if _exists(path):
            raise UserError(f"{path} already exists; choose a new --out (or --report) path")
        problem = "" if is_uri(path) else write_problem(str(Path(path).parent))
        if problem:
            raise UserError(f"{flag} {path}: {problem}; choose a path in a directory you can write to")
    return out, report_path


def _split(path: str) -> tuple[str, str]:
    if is_uri(path):
        parent, _, name = path.rstrip("/").rpartition("/")
        return parent, name
    local = Path(path)
    return str(local.parent), local.name


def _exists(path: str) -> bool:
    """Whether anything (a file, or a directory: --format hf writes one) is at `path`."""
    if not is_uri(path):
        return Path(path).exists()
    filesystem, located = resolve(path)
    return filesystem.get_file_info(located).type != pafs.FileType.NotFound


def _export(
    model: nn.Module,
    workload: Workload,
    format: str,
    paths: tuple[str, str],
    options: _Options,
    source: dict[str, Any],
) -> ExportResult:
    model = copy.deepcopy(model).cpu().eval()
    if format == "hf":
        return _export_hf(model, workload, paths, source, options.compressed_tensors)
    int8_activations = options.int8_activations
    inputs = workload.example_inputs(TRACE_BATCH)
    if format == "onnx":
        written = export_onnx(model, inputs, int8_activations=int8_activations)
    else:
        written = export_program(model, inputs)
    check = _check(model, workload, written, format, int8_activations)
    out, report_path = paths
    report = {
        "format": format,
        "path": out,
        "bytes": len(written.data),
        "source": source,
        "workload": workload.name,
        "runtime": written.runtime,
        "inputs": written.inputs,
        "outputs": written.outputs,
        "dynamic_axes": "dim 0 (batch) of every input",
        **({"int8_activations": int8_activations} if format == "onnx" else {}),
        **_layer_tables(model, written.layers, unused_layers(model, inputs)),
        "check": check,
    }
    write_atomic(*_split(out), written.data)
    _write_report(out, report_path, report)
    return ExportResult(path=out, bytes=len(written.data), report=report, report_path=report_path)


def _export_hf(
    model: nn.Module, workload: Workload, paths: tuple[str, str], source: dict[str, Any], compressed_tensors: bool
) -> ExportResult:
    """A transformers model directory (orchestrator.export.hf), then its report."""
    from orchestrator.export.hf import write_hf

    out, report_path = paths
    report = write_hf(model, workload, out, source, compressed_tensors=compressed_tensors)
    _write_report(out, report_path, report)
    return ExportResult(path=out, bytes=report["bytes"], report=report, report_path=report_path)


def _write_report(out: str, report_path: str, report: dict[str, Any]) -> None:
    """The report of an artifact already written; an artifact whose report cannot be written is removed (a file, or
    the directory of --format hf), never left alone."""
    try:
        write_atomic(*_split(report_path), (json.dumps(report, indent=2) + "\n").encode())
    except BaseException:
        filesystem, path = resolve(out)
        with contextlib.suppress(Exception):
            if filesystem.get_file_info(path).type == pafs.FileType.Directory:
                filesystem.delete_dir(path)
            else:
                filesystem.delete_file(path)
        raise


def _check(model: nn.Module, workload: Workload, written: Written, format: str, int8: bool) -> dict[str, Any]:
    """Run the artifact at batch sizes CHECK_BATCH and 1 and compare it with the PyTorch model."""
    batches = [workload.example_inputs(CHECK_BATCH), workload.example_inputs(1)]
    run = onnx_outputs if format == "onnx" else program_outputs
    static = any(getattr(module, "act_bits", None) is not None for module in model.modules())
    quantized = format == "onnx" and (int8 or static)
    tolerance = QUANTIZED_ACTIVATIONS_TOLERANCE if quantized else TOLERANCE
    why = ": activations are quantised, and an upstream float32 difference can flip a rounding" if quantized else ""
    references = [reference_outputs(model, batch) for batch in batches]
    result = compare(references, [run(written.data, batch) for batch in batches], tolerance, why)
    count = batch_length(batches[0])
    return {"inputs": f"the workload's first {count} validation examples, at batch sizes {count} and 1", **result}


def _layer_tables(model: nn.Module, written: list[dict[str, Any]], unused: list[str]) -> dict[str, Any]:
    """Every weight layer the outputs depend on, in model order (the writer's entry for packed ones), the layers
    they do not (`unused`: absent from the graph), and the two lists a deployer reads first: quantised layers
    without a low-bit kernel, layers whose zeros run dense."""
    entries = {entry["name"]: entry for entry in written}
    layers = []
    for name, module in model.named_modules():
        if any(name == layer or name.startswith(f"{layer}.") for layer in unused):
            continue
        if isinstance(module, PackedLayer | PackedEmbedding):
            if (name or "model") not in entries:
                raise ExportError(f"layer {name or 'model'} runs in the model but the exporter wrote no node for it")
            layers.append({**entries[name or "model"], "weight_shape": _weight_shape(module)})
        elif isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
            layers.append(_plain_layer(name, module))
    return {
        "layers": layers,
        "unused_layers": unused,
        "no_low_bit_kernel": [e["name"] for e in layers if e["bits"] < 16 and not e["low_bit_kernel"]],
        "sparse_run_dense": {e["name"]: e["sparsity"] for e in layers if e["sparsity"] >= SPARSITY_NOTE},
    }


def _weight_shape(module: PackedLayer | PackedEmbedding) -> list[int]:
    if isinstance(module, PackedLayer):
        return list(module.weight_shape)
    return [module.num_embeddings, module.embedding_dim]


def _plain_layer(name: str, module: nn.Linear | nn.Conv2d | nn.Embedding) -> dict[str, Any]:
    weight = module.weight.detach()
    sparsity = round(float((weight == 0).float().mean()), 4)
    notes = [f"{sparsity:.0%} zero weights, stored and run dense"] if sparsity >= SPARSITY_NOTE else []
    return {"name": name, "type": type(module).__name__, "bits": 32, "op": "as exported by torch",
            "stored_bits": 32, "kernel": "fp32", "low_bit_kernel": False, "sparsity": sparsity, "notes": notes,
            "weight_shape": list(weight.shape)}  # fmt: skip

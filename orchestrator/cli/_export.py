"""`python -m orchestrator export CKPT --format onnx|torch-export|hf --out PATH`: a deployable artifact, checked.

Exit codes: 0 when the artifact's outputs match PyTorch's within the recorded tolerance; 2 for bad input (a
missing or damaged checkpoint, an unknown format, an existing --out: one `error:` line); 1 when the check
fails (the artifact and report are written for inspection; that is a bug to report).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from orchestrator.export import FORMATS

EXIT_CHECK_FAILED = 1


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (local path or s3://, gs://)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="onnx, torch-export (a .pt2 program) or hf (a Hugging Face model directory, for transformers causal LMs)",
    )
    parser.add_argument(
        "--out", required=True, metavar="PATH", help="the file (hf: the directory) to write; must not exist"
    )
    parser.add_argument("--report", metavar="PATH", help="where the JSON report goes (default: OUT.json)")
    parser.add_argument(
        "--int8-activations",
        action="store_true",
        help="onnx: let ONNX Runtime quantise activations its own way for its faster kernels (8-bit Linear layers: "
        "DynamicQuantizeMatMul; 2-4-bit: MatMulNBits at accuracy level 4); outputs drift further from PyTorch's, "
        "and the check's tolerance is looser",
    )
    parser.add_argument(
        "--compressed-tensors",
        action="store_true",
        help="hf: keep 2-8-bit Linear weights packed in compressed-tensors' pack-quantized format (llm-compressor's), "
        "which transformers loads only where the compressed-tensors package is installed; default: dequantized float",
    )
    parser.add_argument("--workload", help="workload (default: the one recorded in the checkpoint, if built in)")
    parser.add_argument(
        "--data-dir", metavar="DIR", help="data directory (default: none; cifar10 needs the CIFAR-10 python batches)"
    )
    parser.add_argument(
        "--weights", metavar="FILE", help="cifar10: baseline weights as a local safetensors file (default: none)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_export(args: argparse.Namespace) -> int:
    from orchestrator.export import export_checkpoint

    result = export_checkpoint(
        args.checkpoint,
        out=args.out,
        format=args.format,
        workload=args.workload,
        report=args.report,
        int8_activations=args.int8_activations,
        compressed_tensors=args.compressed_tensors,
        data_dir=args.data_dir,
        weights=args.weights,
    )
    print(json.dumps(result.report, indent=2) if args.json else format_export(result.report, result.report_path))
    if not result.passed:
        print(f"error: {_failure(result.report['check'])}; {result.path} is kept for inspection: please report this",
              file=sys.stderr)  # fmt: skip
        return EXIT_CHECK_FAILED
    return 0


def _failure(check: dict[str, Any]) -> str:
    """What a failed check found, in a clause."""
    if check["max_abs_diff"] > check["tolerance"] or "generation" not in check:
        return f"the export's outputs differ from PyTorch's by {check['max_abs_diff']:.3g} (tolerance " \
               f"{check['tolerance']:.3g})"  # fmt: skip
    return "the export's greedy tokens differ from the checkpoint's"


def _size(count: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def format_export(report: dict[str, Any], report_path: str) -> str:
    """A short summary: the file, how its layers run, what has no low-bit kernel, what runs dense, the check."""
    if report["format"] == "hf":
        return format_hf(report, report_path)
    source = report["source"]
    against = f"; checkpoint {_size(source['checkpoint_bytes'])}" if "checkpoint_bytes" in source else ""
    lines = [
        f"exported   {report['path']} ({report['format']}, {_size(report['bytes'])}{against})",
        f"inputs     {', '.join(report['inputs'])} (batch axis dynamic) -> {', '.join(report['outputs'])}",
        f"runs on    {report['runtime']}",
    ]
    kinds = Counter(f"{layer['stored_bits']}-bit {layer['op']}" for layer in report["layers"])
    lines.append("layers     " + ", ".join(f"{count} x {kind}" for kind, count in kinds.items()))
    if report["no_low_bit_kernel"]:
        names = ", ".join(report["no_low_bit_kernel"])
        lines.append(f"no kernel  {names}: no low-bit kernel in this runtime (dequantized to fp32, see the report)")
    if report["sparse_run_dense"]:
        dense = ", ".join(f"{name} {value:.0%}" for name, value in report["sparse_run_dense"].items())
        lines.append(f"sparse     {dense} zero weights: stored and run dense (no sparse kernel)")
    check = report["check"]
    verdict = "pass" if check["passed"] else "FAIL"
    lines.append(
        f"check      max |diff| {check['max_abs_diff']:.3g}, mean {check['mean_abs_diff']:.3g} against PyTorch "
        f"(tolerance {check['tolerance']:.3g}): {verdict}, on {check['inputs']}"
    )
    lines.append(f"report     {report_path}")
    return "\n".join(lines)


def format_hf(report: dict[str, Any], report_path: str) -> str:
    """The summary of a Hugging Face directory: files, shapes that changed, dequantized layers, the two checks."""
    source, check = report["source"], report["check"]
    against = f"; checkpoint {_size(source['checkpoint_bytes'])}" if "checkpoint_bytes" in source else ""
    changes = ", ".join(f"{key} {was} -> {now}" for key, (was, now) in report["config_changes"].items())
    generation = check["generation"]
    lines = [
        f"exported   {report['path']} (hf directory: {', '.join(report['files'])}; {_size(report['bytes'])}{against})",
        f"model      {report['architecture']}; config {changes or 'as the original'}; "
        f"tie_word_embeddings {report['tie_word_embeddings']}",
        f"loads in   {report['runtime']}",
        *(f"note       {note}" for note in report["notes"]),
        f"check      logits max |diff| {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}) on "
        f"{check['inputs']}; greedy {generation['new_tokens']} tokens from {len(generation['prompts'])} prompts "
        f"{'the same' if generation['same'] else 'DIFFER'}: {'pass' if check['passed'] else 'FAIL'}",
        f"report     {report_path}",
    ]
    return "\n".join(lines)

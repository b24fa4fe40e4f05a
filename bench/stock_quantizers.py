"""The stock quantizers a user tries first, beside the project's own policies, on a pretrained model, in one run.

    python -m bench.stock_quantizers          # bench.minilm, batch 1 and 32: docs/bench/stock_quantizers_minilm.json
    python -m bench.stock_quantizers --quick  # smoke run: 3 rounds, batch 1 (JSON to the temp dir)

One process, one thread (as a search trial computes), every artifact of the same baseline: torch fp32; ONNX Runtime
fp32 (the project's exporter); ONNX Runtime's `quantize_dynamic` with its defaults (QInt8 weights) and with QUInt8
weights; torch dynamic int8 (`torch.ao.quantization.quantize_dynamic` on every Linear); and the project's policies
applied with `orchestrator.executor.apply` (the code path of `python -m orchestrator apply`), no fine-tuning, each
as its torch checkpoint and its ONNX file: round-to-nearest w8a8-dynamic and 4-bit group-128 weight-only, and the
calibrated ones in `examples/policies/` (GPTQ int4, SmoothQuant w8a8) when they are in the tree.

Decisions:
- The metric is the workload's on its test split, measured on the artifact itself (an ONNX file in its session).
  Size is the artifact's bytes (checkpoint files, ONNX file, `torch.save` of torch's quantised state dict).
- Speed: every artifact paired with the torch fp32 baseline (`orchestrator.measure.time_paired` across runtimes:
  alternating blocks, the median of per-round ratios with its 10th-90th percentile spread, never narrower than
  +-5%). A block is at least BLOCK_S of the baseline's time and at least one forward (batch 32 in fp32 takes
  ~1 s here, so deploy's floor of 3 forwards would triple the run).
- ONNX Runtime's defaults quantise activations to uint8 and weights to int8: on AVX2 CPUs without VNNI its u8 x s8
  GEMM sums pairs of products in saturating int16 (`vpmaddubsw`; ORT's docs suggest QUInt8 weights or
  `reduce_range` there, and the project's own int8 export stores weights as uint8 for that reason:
  `orchestrator/export/_onnx_layers.py`), so the QUInt8 row measures what the caveat costs on this machine.
- A project policy's ONNX row records the export check (largest difference to the PyTorch model, its bound):
  a mismatch is a measurement, the artifact is still scored.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import _common, deploy
from bench.deploy import Candidate
from orchestrator.errors import UserError
from orchestrator.measure import measure_artifact, measure_reference, time_latency, time_paired
from orchestrator.policy import Policy
from orchestrator.workloads import Workload, resolve_workload
from techniques.tools.inputs import Inputs

WORKLOAD = "bench.minilm:make_workload"
BLOCK_S = 0.1  # seconds of baseline time per timed block
POLICIES = Path(__file__).parent.parent / "examples" / "policies"
RTN = {  # round-to-nearest, every Linear and embedding, no fine-tuning
    "project RTN w8a8-dynamic": {"bits": {"_default": "w8a8-dynamic"}},
    "project RTN int4 g128 (weight-only)": {"bits": {"_default": 4}, "group_size": 128, "fit_groups": True},
}
CALIBRATED = {  # another helper's policies (issue #24); rows once the files exist
    "project GPTQ int4 g128": "gptq_int4.json",
    "project SmoothQuant w8a8": "smoothquant_w8a8.json",
}


# --------------------------------------------------------------------------- artifacts


def ort_candidates(baseline: nn.Module, workload: Workload) -> list[Candidate]:
    """ONNX Runtime fp32, its `quantize_dynamic` defaults (QInt8 weights), and QUInt8 weights (see Decisions)."""
    from onnxruntime.quantization import QuantType

    fp32, defaults = deploy.onnxruntime_candidates(baseline, workload)
    u8 = deploy.ort_dynamic_int8(fp32.timed, weight_type=QuantType.QUInt8)
    return [fp32, defaults, deploy.onnx_candidate(f"{deploy.ORT_INT8} (QUInt8 weights)", "onnxruntime", u8, workload)]


def project_policies() -> tuple[dict[str, Policy], dict[str, str]]:
    """The project's policies by row name, and the calibrated ones not (yet) usable, with why."""
    found = {name: deploy.policy_of(("quantization", {**data, "activation_bits": None})) for name, data in RTN.items()}
    pending = {}
    for name, file in CALIBRATED.items():
        path = POLICIES / file
        if not path.is_file():
            pending[name] = f"{path.relative_to(POLICIES.parent.parent)} is not in the tree yet"
            continue
        try:
            found[name] = Policy.load(str(path))
        except UserError as exc:  # the technique it names has not landed
            pending[name] = f"{path.name}: {exc}"
    return found, pending


def project_candidates(
    policies: dict[str, Policy], workload: Workload, baseline: nn.Module, pending: dict[str, str]
) -> list[Candidate]:
    """Each policy applied (the baseline measured once for torch), as its checkpoint and its ONNX file, with the
    export check beside the ONNX one. A calibrated policy that fails (its technique still being built) goes to
    `pending` with its error's first line; the round-to-nearest ones must not fail."""
    reference = measure_reference(workload, baseline, torch.device("cpu"))
    found = []
    for name, policy in policies.items():
        kind = "project " + ("rtn" if name in RTN else "calibrated")
        started = time.perf_counter()
        try:
            pair = deploy.applied(name, kind, policy, workload, baseline, reference)
        except Exception as exc:
            if name in RTN:
                raise
            pending[name] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            continue
        for candidate in pair:
            candidate.extra["apply_and_export_s"] = round(time.perf_counter() - started, 1)
            if candidate.runtime == "onnxruntime":
                candidate.extra |= candidate.timed.check_metrics()
        found += pair
    return found


# --------------------------------------------------------------------------- timing


def block_runs(baseline: nn.Module, inputs: Inputs) -> int:
    """Forwards per timed block: about BLOCK_S of the baseline's time, 1 to 20 of them."""
    once = time_latency(baseline, inputs, warmup=1, runs=3).median_ms / 1000
    return max(1, min(20, round(BLOCK_S / once)))


def time_beside_baseline(
    candidates: list[Candidate], baseline: nn.Module, workload: Workload, batches: Sequence[int], rounds: int
) -> dict[str, Any]:
    """Every candidate paired with the torch fp32 baseline at each batch size; the load average around each."""
    loads = {}
    for batch in batches:
        inputs = workload.example_inputs(batch)
        runs = block_runs(baseline, inputs)
        before = os.getloadavg()[0]
        for candidate in candidates:
            print(f"timing {candidate.name} at batch {batch} ...", file=sys.stderr, flush=True)
            _, theirs, speedup = time_paired(
                candidate.timed, baseline, inputs, rounds=rounds, runs=runs, warmup=2, across_runtimes=True
            )
            candidate.speedup[str(batch)] = {"median": speedup.median, "low": speedup.low, "high": speedup.high}
            candidate.extra.setdefault("baseline_ms", {})[str(batch)] = theirs.median_ms
        loads[str(batch)] = {"runs_per_block": runs, "load_before": before, "load_after": os.getloadavg()[0]}
    return loads


# --------------------------------------------------------------------------- output


def table(rows: list[dict[str, Any]], batches: Sequence[str]) -> str:
    """Size, test metric and speed beside torch fp32 at each batch size, and the export check of ONNX rows."""
    baseline = rows[0]
    header = ["artifact", "runtime", "bytes", "smaller", "test cosine", *(f"× torch fp32 b{b}" for b in batches)]
    lines = []
    for r in rows:
        check = r["extra"].get("export_max_abs_diff")
        lines.append([
            r["name"], r["runtime"], f"{r['size_bytes']:,}", f"{baseline['size_bytes'] / r['size_bytes']:.2f}×",
            f"{r['test']:.4f}", *(_spread(r["speedup"][b]) for b in batches),
            f"{check:.3g}" if check is not None else "",
        ])  # fmt: skip
    return _common.markdown_table([*header, "export diff"], lines)


def _spread(speedup: dict[str, float]) -> str:
    return f"{speedup['median']:.2f}× [{speedup['low']:.2f}–{speedup['high']:.2f}]"


def run(workload_name: str, batches: Sequence[int], rounds: int, command: str) -> dict[str, Any]:
    torch.set_num_threads(deploy.THREADS)
    report = _common.environment(command, [0])
    workload = resolve_workload(workload_name)
    baseline = workload.load_baseline().eval()
    policies, pending = project_policies()
    size = measure_artifact(baseline)
    base = deploy.torch_candidate("torch fp32 (baseline)", "baseline", baseline, size, workload)
    candidates = [base, *ort_candidates(baseline, workload), deploy.torch_dynamic_int8(baseline, workload)]
    candidates += project_candidates(policies, workload, baseline, pending)
    timing = time_beside_baseline(candidates, baseline, workload, batches, rounds)
    report |= {"bench": "stock_quantizers", "workload": workload_name, "batch_sizes": list(batches),
               "rounds": rounds, "block_s": BLOCK_S, "timing": timing, "pending": pending,
               "policies": {name: p.to_json() for name, p in policies.items()},
               "params": sum(p.numel() for p in baseline.parameters()),
               "rows": [c.row() for c in candidates]}  # fmt: skip
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default=WORKLOAD, help=f"package.module:function (default {WORKLOAD})")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes to time (default 1,32)")
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds per artifact and batch size")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, batch 1, JSON to the temp dir")
    parser.add_argument("--out", type=Path, help="JSON output (default docs/bench/stock_quantizers_minilm.json)")
    args = parser.parse_args(argv)
    command = _common.command_line("stock_quantizers", argv)
    out = args.out or _common.default_out("docs/bench/stock_quantizers_minilm.json", args.quick)
    batches = (1,) if args.quick else tuple(int(b) for b in args.batch_sizes.split(","))
    start = time.perf_counter()
    try:
        report = run(args.workload, batches, 3 if args.quick else args.rounds, command)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["wall_s"] = round(time.perf_counter() - start, 1)
    _common.write_json(out, report)
    print(f"{command}\n{_common.header_line(report)}\n")
    print(table(report["rows"], [str(b) for b in batches]))
    for name, why in report["pending"].items():
        print(f"pending: {name}: {why}")
    print(f"\nwrote {out} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

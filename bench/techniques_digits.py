"""Each technique family on the real digits baseline: accuracy, bytes, params, non-zeros, FLOPs, latency.

    python -m bench.techniques_digits [--quick] [--out PATH]   # default docs/bench/techniques_digits.json

Every row is `orchestrator.executor.apply` of a one- or two-step policy, so its numbers are of the finalized
artifact that a checkpoint stores; each row is also saved and reloaded, and the reloaded validation logits
are compared bitwise. Latency is timed in this one process with `orchestrator.measure.time_latency`:
in each of several rounds every model is timed back to back with the baseline (order alternating by
round), so load drifts hit both alike; a row's latency is the median of its per-round medians and its
ratio the median of its per-round ratios to the baseline timed beside it. The table goes to stdout,
progress to stderr, raw numbers to the JSON file. `tests/test_techniques_digits.py` asserts the same claims with the
same policies (imported from here).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import techniques
from bench import _common
from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.measure import Reference, count_weights, measure_reference, time_latency
from orchestrator.policy import Policy
from orchestrator.workloads import Workload, resolve_workload

SEED = 0
DEFAULT_OUT = "docs/bench/techniques_digits.json"
BATCH_SIZES = (1, 64)
BASELINE = "fp32 baseline"

# Settings of the claims, shared with the acceptance tests.
STRUCTURED_RATIO = 0.5
LOWRANK_RANK = 0.5
SPARSITY = 0.8
KD = {"temperature": 4.0, "alpha": 0.7, "lr": 3e-3, "epochs": 2}
# Thresholds of the claims.
MIN_STRUCTURED_DROP = 0.40
MAX_W4_SIZE_RATIO = 0.20
MIN_LOWRANK_DROP = 0.45
MAX_KD_GAP = 0.01


@dataclass(frozen=True)
class Timing:
    """How latency is sampled: `rounds` passes over the models, each block `warmup` + `runs` calls."""

    rounds: int
    runs: int
    warmup: int


FULL_TIMING = Timing(rounds=7, runs=100, warmup=10)
QUICK_TIMING = Timing(rounds=2, runs=20, warmup=3)


def step(kind: str, **data: Any) -> dict[str, Any]:
    return {"_type": kind, "_version": 1, "_data": data}


def make_policy(name: str, *steps: dict[str, Any]) -> Policy:
    return Policy.from_json({"_type": "policy", "_version": 1, "seed": SEED, "name": name, "steps": list(steps)})


@dataclass(frozen=True)
class Row:
    """One measured policy: the claim it belongs to; `quick` rows also run under --quick."""

    claim: str
    policy: Policy
    quick: bool = True


def _rows() -> dict[str, Row]:
    kd = step("distillation", **KD)
    structured = step("structured_pruning", ratio={"_default": STRUCTURED_RATIO})
    tucker = step("lowrank", rank=LOWRANK_RANK, conv_method="tucker")
    cp = step("lowrank", rank=LOWRANK_RANK, conv_method="cp")
    rows = {
        "structured-50": ("1 structured", (structured,)),
        "structured-50+kd": ("1 structured", (structured, kd)),
        **{f"w{bits}": ("2 quantization", (step("quantization", bits=bits),)) for bits in (8, 6, 4, 3, 2)},
        "w8a8": ("2 quantization", (step("quantization", bits=8, activation_bits=8),)),
        "svd+tucker-0.5": ("3 low-rank", (tucker,)),
        "svd+tucker-0.5+kd": ("3 low-rank", (tucker, kd)),
        "svd+cp-0.5": ("3 low-rank", (cp,)),
    }
    for scope in ("layer", "global"):
        pruning = step("unstructured_pruning", sparsity=SPARSITY, scope=scope)
        rows[f"unstructured-80-{scope}"] = ("4 sparsity+KD", (pruning,))
        rows[f"unstructured-80-{scope}+kd"] = ("4 sparsity+KD", (pruning, kd))
    # CP's TensorLy ALS takes seconds when the machine is quiet and far longer under load: full runs only.
    slow = {"svd+cp-0.5"}
    return {name: Row(claim, make_policy(name, *steps), name not in slow) for name, (claim, steps) in rows.items()}


ROWS = _rows()
POLICIES = {name: row.policy for name, row in ROWS.items()}


# --------------------------------------------------------------------------- measurements


def validation_logits(model: nn.Module, workload: Workload) -> torch.Tensor:
    """The model's logits on the whole validation split, in batch order."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x) for x, _ in workload.batches("validation")])


def reload(result: executor.CompressedModel, workload: Workload) -> nn.Module:
    """The model as `store.save` then `store.load` give it back."""
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        path = str(Path(tmp) / "checkpoint")
        store.save(result.model, result.policy, result.metrics, workload, path)
        return store.load(path, workload).model


def unfinalized(policy: Policy, workload: Workload, baseline: nn.Module) -> nn.Module:
    """The policy's model before `finalize` (fake-quant parametrisations still in place), as apply builds it."""
    torch.manual_seed(policy.seed)
    model = copy.deepcopy(baseline)
    ctx = executor.make_context(workload, baseline, policy.seed, torch.device("cpu"), None)
    for spec in policy.steps:
        model = techniques.apply_spec(model, spec, ctx)
    return model.eval()


def factored_params(baseline: nn.Module, model: nn.Module) -> dict[str, tuple[int, int]]:
    """Layer name -> (parameters before, after) for every baseline Linear/Conv2d that became a Sequential."""

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    modules = dict(model.named_modules())
    return {
        name: (count(layer), count(modules[name]))
        for name, layer in baseline.named_modules()
        if isinstance(layer, nn.Linear | nn.Conv2d) and isinstance(modules.get(name), nn.Sequential)
    }


def paired_latency(
    baseline: nn.Module, models: Mapping[str, nn.Module], inputs: torch.Tensor, timing: Timing
) -> dict[str, dict[str, Any]]:
    """Per-round median latencies (ms) of each model and of the baseline timed beside it, with the ratios.

    The baseline's entry (key BASELINE) pools every baseline block of every pair.
    """
    out: dict[str, dict[str, Any]] = {name: {"rounds": [], "baseline_rounds": []} for name in models}
    for round_index in range(timing.rounds):
        for name, model in models.items():
            pair = [("baseline_rounds", baseline), ("rounds", model)]
            for key, timed in pair if round_index % 2 == 0 else pair[::-1]:
                latency = time_latency(timed, inputs, warmup=timing.warmup, runs=timing.runs)
                out[name][key].append(latency.median_ms)
    for entry in out.values():
        ratios = [m / b for m, b in zip(entry["rounds"], entry["baseline_rounds"], strict=True)]
        entry["median"] = statistics.median(entry["rounds"])
        entry["ratio"] = statistics.median(ratios)
        entry["faster_rounds"] = sum(ratio < 1 for ratio in ratios)
    pooled = [ms for entry in out.values() for ms in entry["baseline_rounds"]]
    out[BASELINE] = {"rounds": pooled, "median": statistics.median(pooled), "ratio": 1.0, "faster_rounds": 0}
    return out


def measure_row(
    name: str, workload: Workload, baseline: nn.Module, reference: Reference
) -> tuple[nn.Module, dict[str, Any]]:
    """Apply one row's policy and record its artifact metrics, reload check and claim-specific extras."""
    claim, policy = ROWS[name].claim, ROWS[name].policy
    start = time.perf_counter()
    result = executor.apply(policy, workload, seed=SEED, baseline=baseline, reference=reference)
    apply_s = time.perf_counter() - start
    logits = validation_logits(result.model, workload)
    reloaded = reload(result, workload)
    metrics = result.metrics
    row: dict[str, Any] = {
        "name": name,
        "claim": claim,
        "policy": policy.to_json(),
        "validation": metrics["validation"],
        "size_bytes": metrics["size_bytes"],
        "compression_ratio": metrics["compression_ratio"],
        "params": metrics["params"],
        "nonzero_params": metrics["nonzero_params"],
        "flops": metrics["flops"],
        "apply_s": apply_s,
        "reload_bitwise_equal": bool(torch.equal(logits, validation_logits(reloaded, workload))),
        "reloaded_validation": workload.evaluate(reloaded, "validation"),
        "kernels": metrics["kernels"],
        "metrics": metrics,
    }
    if policy.techniques() == ["quantization"]:
        fake_quant = unfinalized(policy, workload, baseline)
        fake_logits = validation_logits(fake_quant, workload)
        row["fake_quant_validation"] = workload.evaluate(fake_quant, "validation")
        row["fake_quant_bitwise_equal"] = bool(torch.equal(fake_logits, logits))
        row["fake_quant_max_abs_diff"] = float((fake_logits - logits).abs().max())
    if policy.techniques()[0] == "lowrank":
        layers = factored_params(baseline, result.model)
        row["factored_layers"] = {layer: list(counts) for layer, counts in layers.items()}
        row["factored_params_before"] = sum(before for before, _ in layers.values())
        row["factored_params_after"] = sum(after for _, after in layers.values())
        row["noted_params_after"] = sum(n.get("params_after", 0) for n in result.notes if n["technique"] == "lowrank")
    return result.model, row


# --------------------------------------------------------------------------- claims


def _latency_ratio(rows: Mapping[str, dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """Latency of `name` relative to the baseline timed beside it, per batch size."""
    return {
        batch: {"ratio": entry["ratio"], "faster_rounds": entry["faster_rounds"], "rounds": len(entry["rounds"])}
        for batch, entry in rows[name]["latency_ms"].items()
    }


def claims(rows: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's four claims, each with its numbers and whether it holds on this run."""
    base = rows[BASELINE]
    pruned = rows["structured-50"]
    params_drop = 1 - pruned["params"] / base["params"]
    bytes_drop = 1 - pruned["size_bytes"] / base["size_bytes"]
    structured_latency = _latency_ratio(rows, "structured-50")
    w4 = rows["w4"]
    w4_ratio = w4["size_bytes"] / base["size_bytes"]
    lowrank = {}
    for name in ("svd+tucker-0.5", "svd+cp-0.5"):
        if name not in rows:
            continue
        row = rows[name]
        drop = 1 - row["factored_params_after"] / row["factored_params_before"]
        lowrank[name] = {"before": row["factored_params_before"], "after": row["factored_params_after"], "drop": drop}
    distillation = {}
    for scope in ("layer", "global"):
        without, tuned = rows[f"unstructured-80-{scope}"], rows[f"unstructured-80-{scope}+kd"]
        gap_without = base["validation"] - without["validation"]
        gap_with = base["validation"] - tuned["validation"]
        distillation[scope] = {
            "without_finetune": without["validation"],
            "with_kd": tuned["validation"],
            "gap_without_finetune": gap_without,
            "gap_with_kd": gap_with,
            "holds": gap_with <= MAX_KD_GAP < gap_without,
        }
    return {
        "1 structured": {
            "params_drop": params_drop,
            "bytes_drop": bytes_drop,
            "latency": structured_latency,
            "holds": min(params_drop, bytes_drop) >= MIN_STRUCTURED_DROP
            and all(v["ratio"] < 1 for v in structured_latency.values()),
        },
        "2 quantization": {
            "w4_size_ratio": w4_ratio,
            "w4_reload_bitwise_equal": w4["reload_bitwise_equal"],
            "w4_fake_quant_validation": w4["fake_quant_validation"],
            "w4_reloaded_validation": w4["reloaded_validation"],
            "w8a8_int_layers": [n for n, k in rows["w8a8"]["kernels"].items() if k == "int8_int_mm"],
            "w8a8_latency": _latency_ratio(rows, "w8a8"),
            "holds": w4_ratio <= MAX_W4_SIZE_RATIO
            and w4["reload_bitwise_equal"]
            and w4["fake_quant_validation"] == w4["reloaded_validation"],
        },
        "3 low-rank": {**lowrank, "holds": lowrank["svd+tucker-0.5"]["drop"] >= MIN_LOWRANK_DROP},
        "4 sparsity+KD": {**distillation, "holds": distillation["layer"]["holds"] and distillation["global"]["holds"]},
    }


# --------------------------------------------------------------------------- report


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of every row (latency columns: median ms and ratio to the baseline)."""
    base = rows[0]
    header = ["row", "val acc", "Δ pt", "bytes", "ratio", "params", "non-zeros", "MFLOPs"]
    for batch in BATCH_SIZES:
        header += [f"b{batch} ms", f"b{batch} ×base"]
    header += ["reload ==", "int8 layers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["name"],
            f"{row['validation']:.4f}",
            f"{100 * (row['validation'] - base['validation']):+.1f}",
            f"{row['size_bytes']:,}",
            f"{base['size_bytes'] / row['size_bytes']:.2f}×",
            f"{row['params']:,}",
            f"{row['nonzero_params']:,}",
            f"{row['flops'] / 1e6:.2f}",
        ]
        for batch in BATCH_SIZES:
            entry = row["latency_ms"][str(batch)]
            cells += [f"{entry['median']:.3f}", f"{entry['ratio']:.2f}"]
        integer = sum(kernel == "int8_int_mm" for kernel in row["kernels"].values())
        cells += ["yes" if row["reload_bitwise_equal"] else "NO", str(integer)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(result: Mapping[str, dict[str, Any]]) -> str:
    """One line per claim with its numbers."""
    s, q, lr, kd = (result[key] for key in ("1 structured", "2 quantization", "3 low-rank", "4 sparsity+KD"))

    def verdict(claim: Mapping[str, Any]) -> str:
        return "HOLDS" if claim["holds"] else "DOES NOT HOLD"

    def latency(values: Mapping[str, Mapping[str, Any]]) -> str:
        return ", ".join(
            f"b{b} {v['ratio']:.2f}× baseline (faster in {v['faster_rounds']}/{v['rounds']} rounds)"
            for b, v in values.items()
        )

    lines = [
        f"1. structured 50%: params -{100 * s['params_drop']:.1f}%, bytes -{100 * s['bytes_drop']:.1f}%, "
        f"latency {latency(s['latency'])} -> {verdict(s)}",
        f"2. 4-bit: {q['w4_size_ratio']:.3f}× fp32 bytes, reload bitwise equal: {q['w4_reload_bitwise_equal']}, "
        f"fake-quant acc {q['w4_fake_quant_validation']:.4f} vs reloaded {q['w4_reloaded_validation']:.4f}; "
        f"w8a8 int8 _int_mm layers {q['w8a8_int_layers']}, latency {latency(q['w8a8_latency'])} -> {verdict(q)}",
        "3. low-rank 0.5 on factored layers: "
        + "; ".join(
            f"{n} {v['before']:,} -> {v['after']:,} (-{100 * v['drop']:.1f}%)" for n, v in lr.items() if n != "holds"
        )
        + f" -> {verdict(lr)}",
    ]
    for scope in ("layer", "global"):
        v = kd[scope]
        lines.append(
            f"4. 80% sparsity ({scope} scope): no fine-tune {v['without_finetune']:.4f}, after 2 epochs KD "
            f"{v['with_kd']:.4f} ({100 * v['gap_with_kd']:.2f} pt below baseline) -> {verdict(v)}"
        )
    return "\n".join(lines)


def run(*, quick: bool, out: Path, command: str) -> dict[str, Any]:
    """Measure every row, time each beside the baseline, write the JSON and return it."""
    timing = QUICK_TIMING if quick else FULL_TIMING
    workload = resolve_workload("digits")
    baseline = workload.load_baseline()
    reference = measure_reference(workload, baseline, torch.device("cpu"))
    rows: dict[str, dict[str, Any]] = {
        BASELINE: {
            "name": BASELINE,
            "claim": "",
            "validation": reference.metric,
            "size_bytes": reference.measurements.size_bytes,
            "compression_ratio": 1.0,
            "params": reference.measurements.params,
            "nonzero_params": count_weights(baseline)[1],
            "flops": reference.measurements.flops,
            "reload_bitwise_equal": True,
            "kernels": {},
        }
    }
    models: dict[str, nn.Module] = {}
    for name in (name for name, row in ROWS.items() if row.quick or not quick):
        print(f"applying {name} ...", file=sys.stderr, flush=True)
        models[name], rows[name] = measure_row(name, workload, baseline, reference)
    load_before = os.getloadavg()
    print(
        f"timing {len(models)} models beside the baseline, {timing} (load average {load_before})",
        file=sys.stderr,
        flush=True,
    )
    for batch in BATCH_SIZES:
        for name, entry in paired_latency(baseline, models, workload.example_inputs(batch), timing).items():
            rows[name].setdefault("latency_ms", {})[str(batch)] = entry
    report = {
        "bench": "techniques_digits",
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _common.machine(),
        "load_average_before_timing": list(load_before),
        "load_average_after_timing": list(os.getloadavg()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seed": SEED,
        "quick": quick,
        "timing": {**vars(timing), "batch_sizes": list(BATCH_SIZES)},
        "kd_settings": KD,
        "skipped_rows": [name for name, row in ROWS.items() if quick and not row.quick],
        "rows": list(rows.values()),
    }
    report["claims"] = claims(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats (smoke test, < 60 s)")
    parser.add_argument(
        "--out", type=Path, help=f"JSON output (default {DEFAULT_OUT}; with --quick, a file in the temp directory)"
    )
    args = parser.parse_args(argv)
    command = _common.command_line("techniques_digits", argv)
    start = time.perf_counter()
    # A quick run never replaces the real numbers unless asked to.
    out = args.out or (
        Path(tempfile.gettempdir()) / "techniques_digits-quick.json" if args.quick else Path(DEFAULT_OUT)
    )
    report = run(quick=args.quick, out=out, command=command)
    env = (
        f"{report['date']}  {report['machine']['cpu']} ({report['machine']['cores']} cores)  torch {report['torch']}  "
        f"threads {report['threads']}  seed {report['seed']}  load {report['load_average_before_timing'][0]:.2f}"
    )
    print(f"{command}\n{env}\n")
    print(table(report["rows"]))
    print()
    print(summary(report["claims"]))
    print(f"\nwrote {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Deployment benchmark: the search's front against what a user would otherwise ship, timed side by side.

    python -m bench.deploy --workload digits         # 32 trials as `make demo`, bench/spaces/digits_speed.json
    python -m bench.deploy --workload text           # 16 trials for ONNX Runtime (bench/spaces/text_onnxruntime.json)
    python -m bench.deploy --workload W --run DIR    # the front of a finished search instead of a new one
    python -m bench.deploy --workload digits --quick # smoke run (4 trials, 2 epochs, 3 rounds; JSON to the temp dir)

One process, one thread (as a search trial computes), in one run: the torch fp32 baseline; the Pareto front of a
search (each point as its torch checkpoint and as the ONNX file the exporter writes, run by ONNX Runtime); torch
dynamic int8 (`torch.ao.quantization.quantize_dynamic` on every Linear); ONNX Runtime fp32 and dynamic int8
(`onnxruntime.quantization.quantize_dynamic` on the fp32 export); a distilled half-width student and a uniform
grid (the same bits and pruning ratio everywhere), each fine-tuned with the search's reference budget.

Size is the bytes of each artifact (checkpoint files, ONNX file, or `torch.save` of torch's quantised state
dict); speed is paired against the torch fp32 baseline (`orchestrator.measure.time_paired`: alternating blocks,
the median of per-round ratios with its 10th-90th percentile spread); the metric is the test split's, measured
on the artifact itself (an ONNX file in its session). Each Pareto checkpoint is also re-timed as
`python -m orchestrator evaluate` does, to check the speedup falls inside the spread the search recorded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import _common
from orchestrator.artifacts import store
from orchestrator.artifacts.tables import PARETO_FILE, read_table
from orchestrator.executor import apply
from orchestrator.measure import (
    OnnxSession,
    Reference,
    Timed,
    measure_artifact,
    onnx_session,
    time_latency,
    time_paired,
)
from orchestrator.policy import Policy
from orchestrator.search import SearchConfig, SpaceOptions
from orchestrator.search import run as run_search
from orchestrator.search.space_options import load_space_file
from orchestrator.workloads import Workload, resolve_workload
from techniques.tools.inputs import Inputs

THREADS = 1  # as a search trial computes (cpus_per_trial 1)
BLOCK_S = 0.05  # seconds of baseline time per timed block (a batch of 256 digits takes ~25 ms on one thread)
SPACES = Path(__file__).parent / "spaces"
ORT_FP32, ORT_INT8 = "onnxruntime fp32", "onnxruntime dynamic int8"
ONNX_REFERENCES = (ORT_FP32, ORT_INT8)  # what ONNX candidates are also timed beside
MAX_DROP = 0.02  # the search's guard on validation; the claims are judged on the test split (within 1 point)
QUICK_EPOCHS = (2,)  # distillation epochs of a smoke run (--quick)


@dataclasses.dataclass(frozen=True)
class Preset:
    """How one workload is benchmarked."""

    trials: int
    batch_sizes: tuple[int, ...]  # the first is the search's latency batch size
    target: str
    space_file: str | None
    grid_bits: tuple[Any, ...]
    grid_ratios: tuple[float, ...]


PRESETS = {
    "digits": Preset(32, (1, 256), "onnxruntime", str(SPACES / "digits_speed.json"), (8, 4, 2), (0.0, 0.5)),
    "text": Preset(16, (1,), "onnxruntime", str(SPACES / "text_onnxruntime.json"), ("w8a8-dynamic", 4), (0.0, 0.5)),
}


@dataclasses.dataclass
class Candidate:
    """One artifact as deployed: what it is, how it runs, and what it measured."""

    name: str
    kind: str  # baseline, front, torch int8, onnxruntime, student, grid
    runtime: str  # torch or onnxruntime
    size_bytes: int
    test: float
    timed: Timed = dataclasses.field(repr=False)
    speedup: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # batch → median/low/high
    speedup_vs: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)  # ORT ones
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "timed"}


# --------------------------------------------------------------------------- the search and its front


def bench_space(preset: Preset, quick: bool) -> SpaceOptions:
    """The preset's search space; a smoke run's distils for QUICK_EPOCHS (it checks the pipeline, not accuracy)."""
    space = load_space_file(preset.space_file) if preset.space_file else SpaceOptions()
    if not quick or "epochs" not in space.ranges.get("distillation", {}):
        return space
    ranges = {**space.ranges, "distillation": {**space.ranges["distillation"], "epochs": QUICK_EPOCHS}}
    return dataclasses.replace(space, ranges=ranges)


def search_front(
    workload: Workload, preset: Preset, space: SpaceOptions, run_dir: str | None, storage: str, quick: bool
) -> str:
    """The run directory of the search whose front is benchmarked (a new search unless `run_dir` is given)."""
    if run_dir is not None:
        return run_dir
    config = SearchConfig(
        workload=workload.name,
        objectives=("accuracy", "size", "latency"),
        max_accuracy_drop=MAX_DROP,
        num_trials=4 if quick else preset.trials,
        space=space,
        latency_batch_size=preset.batch_sizes[0],
        target=preset.target,
        storage_path=storage,
        name=f"deploy-{workload.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        report=False,
    )
    return run_search(config).run_dir


def front_rows(run_dir: str) -> list[dict[str, Any]]:
    rows, _ = read_table(run_dir, PARETO_FILE)
    return [row for row in rows if row.get("checkpoint")]


def front_candidates(workload: Workload, run_dir: str, rows: list[dict[str, Any]]) -> list[Candidate]:
    """Each Pareto checkpoint as its torch checkpoint and as the ONNX file (int8 activations where ORT has them)."""
    found = []
    for row in rows:
        loaded = store.load(str(Path(run_dir) / row["checkpoint"]), workload)
        label = f"{row['trial_id']} ({', '.join(loaded.policy.techniques())})"
        recorded = {"recorded_speedup": [row.get("speedup_low"), row.get("speedup"), row.get("speedup_high")],
                    "search_speedup": row.get("search_speedup"), "validation": row.get("validation")}  # fmt: skip
        size = measure_artifact(loaded.model, store.base_architecture(loaded.policy, workload))
        found.append(torch_candidate(f"{label} torch", "front", loaded.model, size, workload, recorded))
        found.append(onnx_candidate(f"{label} onnx", "front", onnx_session(loaded.model, workload), workload))
    return found


# --------------------------------------------------------------------------- what else a user would ship


def torch_candidate(
    name: str, kind: str, model: nn.Module, size: int, workload: Workload, extra: dict[str, Any] | None = None
) -> Candidate:
    model = model.eval()
    return Candidate(name, kind, "torch", size, workload.evaluate(model, "test", "cpu"), model, extra=extra or {})


def onnx_candidate(name: str, kind: str, session: OnnxSession, workload: Workload) -> Candidate:
    test = session.evaluate(workload, "test")  # outputs in the model's own structure, reduced by its output_fn
    return Candidate(name, kind, "onnxruntime", session.size_bytes, test, session)


def torch_dynamic_int8(baseline: nn.Module, workload: Workload) -> Candidate:
    """`torch.ao.quantization.quantize_dynamic` on every Linear; size: its state dict as `torch.save` writes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(baseline), {nn.Linear}, dtype=torch.qint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), path)
        size = path.stat().st_size
    return torch_candidate("torch dynamic int8 (quantize_dynamic, Linear)", "torch int8", model, size, workload)


def onnxruntime_candidates(baseline: nn.Module, workload: Workload) -> list[Candidate]:
    """ONNX Runtime fp32 (the exporter's file) and ORT's own dynamic int8 of it (`quantize_dynamic`, defaults)."""
    fp32 = onnx_session(baseline, workload)
    return [
        onnx_candidate(ORT_FP32, "onnxruntime", fp32, workload),
        onnx_candidate(f"{ORT_INT8} (quantize_dynamic)", "onnxruntime", ort_dynamic_int8(fp32), workload),
    ]


def ort_dynamic_int8(fp32: OnnxSession, **options: Any) -> OnnxSession:
    """`onnxruntime.quantization.quantize_dynamic` of an fp32 ONNX file: its defaults (QInt8 weights) unless
    `options` say otherwise, in a session with the fp32 one's threads and output structure."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        proto = onnx.load_from_string(fp32.data)
        del proto.graph.value_info[:]  # ORT's quantizer re-infers shapes and rejects the exporter's annotations
        onnx.save(proto, source)
        quantize_dynamic(source, target, **{"weight_type": QuantType.QInt8, **options})
        return OnnxSession(target.read_bytes(), fp32.threads, structure=fp32.structure)


def reference_budget(workload: Workload, space: SpaceOptions, baseline: nn.Module) -> dict[str, Any]:
    """The fine-tuning settings the search's reference policies use (its distillation step)."""
    from orchestrator.search.space import build_space

    built = build_space(baseline, space, seed=0, defaults=workload.search_ranges, build_student=workload.build_student)
    references = [params for _, role, params in built.fixed_points() if role == "reference"]
    policy = built.policy(references[0])
    return next(step for step in policy.to_json()["steps"] if step["_type"] == "distillation")["_data"]


def policy_of(*steps: tuple[str, dict[str, Any]]) -> Policy:
    return Policy.from_json(
        {"_type": "policy", "_version": 1, "seed": 0,
         "steps": [{"_type": kind, "_version": 1, "_data": data} for kind, data in steps]}
    )  # fmt: skip


def applied(
    name: str, kind: str, policy: Policy, workload: Workload, baseline: nn.Module, reference: Reference | None = None
) -> list[Candidate]:
    """A policy applied (`reference`: the baseline already measured for torch), as its torch checkpoint and as
    its ONNX file."""
    print(f"applying {name} ...", file=sys.stderr, flush=True)
    compressed = apply(policy, workload, baseline=baseline, reference=reference)
    size = compressed.metrics["size_bytes"]
    return [
        torch_candidate(f"{name} torch", kind, compressed.model, size, workload),
        onnx_candidate(f"{name} onnx", kind, onnx_session(compressed.model, workload), workload),
    ]


def trained_comparisons(workload: Workload, preset: Preset, budget: dict[str, Any], baseline: nn.Module, quick: bool):
    """The half-width student and the uniform grid, each distilled with `budget`."""
    found = []
    if workload.build_student is not None:
        student = policy_of(("student", {"width": 0.5}), ("distillation", budget))
        found += applied("half-width student", "student", student, workload, baseline)
    grid = list(itertools.product(preset.grid_bits, preset.grid_ratios))
    for bits, ratio in grid[:1] if quick else grid:
        steps = [("structured_pruning", {"ratio": {"_default": ratio}})] if ratio else []
        steps += [("quantization", {"bits": {"_default": bits}, "activation_bits": None}), ("distillation", budget)]
        name = f"uniform {bits}{'-bit' if isinstance(bits, int) else ''}" + (
            f" + {ratio:.0%} channels" if ratio else ""
        )
        found += applied(name, "grid", policy_of(*steps), workload, baseline)
    return found


# --------------------------------------------------------------------------- timing and checks


def time_all(candidates: list[Candidate], baseline: nn.Module, workload: Workload, batches, rounds: int) -> None:
    """Every candidate paired with the torch fp32 baseline, and every ONNX one also with ONNX Runtime's fp32 and
    dynamic int8 models (same runtime, so the compression's own speedup there), at each batch size, in one
    process."""
    sessions = {name: c.timed for c in candidates for name in ONNX_REFERENCES if c.name.startswith(name)}
    for batch in batches:
        inputs = workload.example_inputs(batch)
        runs = runs_per_block(baseline, inputs)
        for candidate in candidates:
            candidate.speedup[str(batch)] = paired(candidate.timed, baseline, inputs, rounds, runs)
            if candidate.runtime == "onnxruntime":
                for name, session in sessions.items():
                    spread = paired(candidate.timed, session, inputs, rounds, runs)
                    candidate.speedup_vs.setdefault(name, {})[str(batch)] = spread


def paired(model: Timed, beside: Timed, inputs: Inputs, rounds: int, runs: int) -> dict[str, float]:
    _, _, speedup = time_paired(model, beside, inputs, rounds=rounds, runs=runs, across_runtimes=True)
    return {"median": speedup.median, "low": speedup.low, "high": speedup.high}


def runs_per_block(baseline: nn.Module, inputs: Inputs, block_s: float = BLOCK_S) -> int:
    """Forwards per timed block: about `block_s` of the baseline's time, 3 to 20 of them."""
    time_latency(baseline, inputs, warmup=2, runs=3)
    once = time_latency(baseline, inputs, warmup=0, runs=5).median_ms / 1000
    return max(3, min(20, round(block_s / once)))


def evaluated(checkpoint: Path) -> dict[str, Any]:
    """`python -m orchestrator evaluate CHECKPOINT --json` in a fresh process, as a user runs it (in this process,
    with the benchmark's many ONNX Runtime sessions alive, a 30 us model's calls ran 6-10 us slower)."""
    command = [sys.executable, "-m", "orchestrator", "evaluate", str(checkpoint.resolve()), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    return json.loads(done.stdout[done.stdout.index("{") :])


def retimed_as_evaluate(run_dir: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each Pareto checkpoint re-timed by `python -m orchestrator evaluate`, beside the search's spread."""
    checks = []
    for row in rows:
        again = evaluated(Path(run_dir) / row["checkpoint"])
        checks.append({"trial_id": row["trial_id"], "recorded": again.get("recorded_speedup"),
                       "evaluate": [again.get("speedup_low"), again["speedup"], again.get("speedup_high")],
                       "baseline_latency_ms": again.get("baseline_latency_ms"),
                       "agrees": again.get("agrees", False)})  # fmt: skip
    return checks


def exported(run_dir: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each Pareto checkpoint through `python -m orchestrator export`'s code path, in both formats."""
    from orchestrator.export import export_checkpoint

    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for row, format in itertools.product(rows, ("onnx", "torch-export")):
            out = Path(tmp) / f"{row['trial_id']}.{'onnx' if format == 'onnx' else 'pt2'}"
            result = export_checkpoint(Path(run_dir) / row["checkpoint"], out=out, format=format)
            check = result.report["check"]
            found.append({"trial_id": row["trial_id"], "format": format, "bytes": result.bytes,
                          "passed": result.passed, "max_abs_diff": check["max_abs_diff"],
                          "tolerance": check["tolerance"]})  # fmt: skip
    return found


def acceptance(rows: list[dict[str, Any]], batch: str) -> dict[str, Any]:
    """The front artifacts within one test point of the baseline: the fastest and the smallest in each runtime,
    with their speed beside torch fp32 (and, for ONNX files, beside ONNX Runtime's fp32), and each beside ONNX
    Runtime's dynamic int8 on size, speed and metric (ahead, behind or level)."""
    baseline = rows[0]
    near = [r for r in rows if r["kind"] == "front" and r["test"] >= baseline["test"] - 0.01]
    ort_int8 = next(r for r in rows if r["name"].startswith(ORT_INT8))
    picked = {}
    for runtime in ("torch", "onnxruntime"):
        mine = [r for r in near if r["runtime"] == runtime]
        if mine:
            picked[f"fastest {runtime}"] = max(mine, key=lambda r: r["speedup"][batch]["median"])
            picked[f"smallest {runtime}"] = min(mine, key=lambda r: r["size_bytes"])
    beating = [r["name"] for r in near if ahead_without_behind(against(r, ort_int8, batch))]
    return {
        "batch_size": int(batch),
        "within_one_point": len(near),
        "ahead_of_ort_int8_without_being_behind": beating,
        **{label: {"name": r["name"], "smaller": baseline["size_bytes"] / r["size_bytes"],
                   "speedup": r["speedup"][batch], "delta_test": r["test"] - baseline["test"],
                   "speedup_vs_onnxruntime_fp32": r["speedup_vs"].get(ORT_FP32, {}).get(batch),
                   "against_ort_int8": against(r, ort_int8, batch)}
           for label, r in picked.items()},
    }  # fmt: skip


def against(mine: dict[str, Any], theirs: dict[str, Any], batch: str) -> dict[str, str]:
    """Ahead, behind or level on size (bytes), speed (an ONNX file timed beside theirs decides by its spread;
    otherwise both spreads beside torch fp32) and metric (test)."""
    size = _verdict(theirs["size_bytes"] - mine["size_bytes"])
    direct = mine["speedup_vs"].get(ORT_INT8, {}).get(batch)
    if direct is not None:
        speed = "ahead" if direct["low"] > 1 else "behind" if direct["high"] < 1 else "level"
    else:
        a, b = mine["speedup"][batch], theirs["speedup"][batch]
        speed = "ahead" if a["low"] > b["high"] else "behind" if a["high"] < b["low"] else "level"
    return {"size": size, "speed": speed, "metric": _verdict(mine["test"] - theirs["test"])}


def ahead_without_behind(verdicts: dict[str, str]) -> bool:
    return "ahead" in verdicts.values() and "behind" not in verdicts.values()


def _verdict(difference: float) -> str:
    return "ahead" if difference > 0 else "behind" if difference < 0 else "level"


# --------------------------------------------------------------------------- output


def table(rows: list[dict[str, Any]], baseline: dict[str, Any], batches: Sequence[str]) -> str:
    """Size, metric and speed beside torch fp32 at each batch size; ONNX files also beside ONNX Runtime's fp32
    and dynamic int8 at the first."""
    first = batches[0]
    header = ["artifact", "runtime", "bytes", "smaller", "test", "Δ test (pt)"]
    header += [f"× torch fp32, b{b} [p10–p90]" for b in batches]
    header += [f"× {name}, b{first}" for name in ONNX_REFERENCES]
    lines = []
    for r in rows:
        smaller = f"{baseline['size_bytes'] / r['size_bytes']:.2f}×"
        delta = f"{100 * (r['test'] - baseline['test']):+.2f}"
        speeds = [_spread(r["speedup"][b]) for b in batches]
        speeds += [_spread(r["speedup_vs"][name][first]) if name in r["speedup_vs"] else "" for name in ONNX_REFERENCES]
        lines.append([r["name"], r["runtime"], f"{r['size_bytes']:,}", smaller, f"{r['test']:.4f}", delta, *speeds])
    return _common.markdown_table(header, lines)


def _spread(speedup: dict[str, float]) -> str:
    return f"{speedup['median']:.2f}× [{speedup['low']:.2f}–{speedup['high']:.2f}]"


def run(
    workload_name: str, preset: Preset, run_dir: str | None, storage: str, quick: bool, command: str
) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    workload = resolve_workload(workload_name)
    baseline = workload.load_baseline().eval()
    space = bench_space(preset, quick)
    run_dir = search_front(workload, preset, space, run_dir, storage, quick)
    rows = front_rows(run_dir)
    budget = reference_budget(workload, space, baseline)
    base = torch_candidate("torch fp32 (baseline)", "baseline", baseline, measure_artifact(baseline), workload)
    candidates = [base, *front_candidates(workload, run_dir, rows), torch_dynamic_int8(baseline, workload)]
    candidates += onnxruntime_candidates(baseline, workload)
    candidates += trained_comparisons(workload, preset, budget, baseline, quick)
    print(f"timing {len(candidates)} artifacts beside the baseline ...", file=sys.stderr, flush=True)
    time_all(candidates, baseline, workload, preset.batch_sizes, 3 if quick else 15)
    report = _common.environment(command, [0])
    report |= {"bench": "deploy", "workload": workload_name, "run_dir": run_dir, "preset": dataclasses.asdict(preset),
               "fine_tuning_budget": budget, "threads": torch.get_num_threads(),
               "rows": [c.row() for c in candidates]}  # fmt: skip
    report["evaluate_retiming"] = retimed_as_evaluate(run_dir, rows)
    report["exports"] = exported(run_dir, rows)
    report["acceptance"] = acceptance(report["rows"], str(preset.batch_sizes[0]))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--run", help="a finished search's run directory (its front is benchmarked; no new search)")
    parser.add_argument("--storage-path", default="runs", help="where the new search's run directory goes")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 trials, 2 epochs, 3 rounds, one grid point")
    parser.add_argument(
        "--target", choices=("torch", "onnxruntime"), help="the search's target (default: the preset's)"
    )
    parser.add_argument(
        "--batch-sizes", help="comma-separated; the first is the search's latency batch size (default: the preset's)"
    )
    parser.add_argument("--out", type=Path, help="JSON output (default docs/bench/deploy_WORKLOAD.json)")
    args = parser.parse_args(argv)
    command = _common.command_line("deploy", argv)
    out = args.out or _common.default_out(f"docs/bench/deploy_{args.workload}.json", args.quick)
    start = time.perf_counter()
    preset = PRESETS[args.workload]
    if args.target:
        preset = dataclasses.replace(preset, target=args.target)
    if args.batch_sizes:
        preset = dataclasses.replace(preset, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
    report = run(args.workload, preset, args.run, args.storage_path, args.quick, command)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    _common.write_json(out, report)
    baseline = report["rows"][0]
    print(f"{command}\n{_common.header_line(report)}\n")
    print(table(report["rows"], baseline, [str(b) for b in report["preset"]["batch_sizes"]]))
    print("\nre-timed as `orchestrator evaluate`:", json.dumps(report["evaluate_retiming"]))
    print("within one test point:", json.dumps(report["acceptance"], indent=1))
    print("exports:", json.dumps([[e["trial_id"], e["format"], e["bytes"], e["passed"]] for e in report["exports"]]))
    print(f"\nwrote {out} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

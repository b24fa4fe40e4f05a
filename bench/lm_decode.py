"""Language-model speed as LM users measure it: prefill and decode tokens per second, paired beside the baseline.

    python -m bench.lm_decode --run runs/NAME       # the Pareto checkpoints of an `lm` search, plus stock int8
    python -m bench.lm_decode --policy examples/policies/gptq_int4.json   # a policy applied to the baseline
    python -m bench.lm_decode --quick               # smoke run: 3 rounds, the stock candidates only

One process, one thread (as a search trial computes), torch. For each model: **prefill** (one forward over a
`--prompt`-token prompt, tokens/s = prompt / time) and **decode** (one greedy step with a key/value cache already
holding `--prompt` tokens, tokens/s = 1 / time), each timed in alternating blocks beside the fp32 baseline
(`orchestrator.measure.time_paired`: the median of per-round ratios with its 10th-90th percentile spread, never
narrower than +-5%); the test perplexity; the KL divergence of its next-token distribution from the baseline's
on the validation windows; greedy tokens with the cache equal to those without it; and peak resident memory of a
fresh process that loads the model and generates `--new-tokens` tokens.

Decisions:
- A decode step is timed at a fixed context: the cache is filled once with the prompt, and after each step it
  is cropped back to the prompt (`DynamicCache.crop`), so every timed step attends to the same number of tokens.
- The search's own latency objective times a whole window (prefill); decode speed is measured here, on the
  models the search returned, beside torch's dynamic int8 (`quantize_dynamic` on every Linear).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import _common, deploy
from orchestrator.artifacts import store
from orchestrator.artifacts.tables import PARETO_FILE, read_table
from orchestrator.errors import UserError
from orchestrator.executor import apply
from orchestrator.measure import time_paired
from orchestrator.policy import Policy
from orchestrator.workloads import Workload, resolve_workload
from orchestrator.workloads.lm import kl_to_reference

WORKLOAD = "lm"


class Prefill(nn.Module):
    """One forward of a causal LM over a fixed prompt, no cache kept."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class DecodeStep(nn.Module):
    """One greedy decode step after a cache filled with the prompt; the cache is cropped back after each step."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor) -> None:
        super().__init__()
        from transformers import DynamicCache

        self.model, self.context = model, prompt.shape[1]
        self.cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            out = model(input_ids=prompt, past_key_values=self.cache, use_cache=True)
        self.next_token = out.logits[:, -1:].argmax(-1)
        self.position = torch.tensor([self.context])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=self.next_token, past_key_values=self.cache, use_cache=True, cache_position=self.position
        )
        self.cache.crop(-1)  # drop the step just appended: the next step sees the same context
        return out.logits


def generates_alike(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> bool:
    """Greedy tokens with the key/value cache equal those without it."""
    with torch.inference_mode():
        cached = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
        plain = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
    return bool(torch.equal(cached, plain))


def kl_from_baseline(model: nn.Module, baseline: nn.Module, workload: Workload) -> float:
    """Mean KL(baseline ‖ model) per token over the validation windows."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, _ in workload.batches("validation"):
            logits = [m(input_ids=x["input_ids"], use_cache=False).logits.transpose(1, 2) for m in (model, baseline)]
            total += kl_to_reference(*logits) * len(x["input_ids"])
            count += len(x["input_ids"])
    return total / count


def speed(model: nn.Module, baseline: nn.Module, prompt: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Prefill and decode, each paired with the baseline's: tokens/s (median) and the speedup with its spread."""
    found = {}
    for name, make, tokens in (("prefill", Prefill, prompt.shape[1]), ("decode", None, 1)):
        ours = Prefill(model) if make else DecodeStep(model, prompt)
        theirs = Prefill(baseline) if make else DecodeStep(baseline, prompt)
        latency, base, ratio = time_paired(ours, theirs, {"input_ids": prompt}, rounds=rounds, runs=5)
        found[name] = {
            "tokens_per_s": tokens / (latency.median_ms / 1000),
            "baseline_tokens_per_s": tokens / (base.median_ms / 1000),
            "speedup": {"median": ratio.median, "low": ratio.low, "high": ratio.high},
        }
    return found


def peak_rss_mb(workload: str, source: str, new_tokens: int) -> float:
    """Peak resident memory (MiB) of a fresh process that loads `source` and generates `new_tokens` tokens."""
    command = [sys.executable, "-m", "bench.lm_decode", "--workload", workload, "--peak-of", source,
               "--new-tokens", str(new_tokens)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    return float(done.stdout.strip().splitlines()[-1])


def _load(source: str, workload: Workload) -> nn.Module:
    """The baseline ("baseline"), a checkpoint directory, or torch dynamic int8 of the baseline ("torch-int8")."""
    baseline = workload.load_baseline().eval()
    if source == "baseline":
        return baseline
    if source == "torch-int8":
        return deploy.torch_dynamic_int8(baseline, workload).timed
    return store.load(source, workload).model.eval()


def _peak_main(workload_name: str, source: str, new_tokens: int) -> int:
    torch.set_num_threads(deploy.THREADS)
    workload = resolve_workload(workload_name)
    model = _load(source, workload)
    prompt = workload.example_inputs(1)["input_ids"]
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return 0


def sources(run_dir: str | None, policies: Sequence[str], workload: Workload, scratch: Path) -> dict[str, str]:
    """Name → what `_load` loads: the stock candidates, each Pareto checkpoint, each policy applied (saved)."""
    found = {"torch fp32 (baseline)": "baseline", "torch dynamic int8": "torch-int8"}
    if run_dir is not None:
        rows, _ = read_table(run_dir, PARETO_FILE)
        found |= {f"front {r['trial_id']}": str(Path(run_dir) / r["checkpoint"]) for r in rows if r.get("checkpoint")}
    for path in policies:
        policy = Policy.loads(Path(path).read_text())
        compressed = apply(policy, workload, baseline=workload.load_baseline().eval())
        destination = scratch / Path(path).stem
        store.save(compressed.model, policy, compressed.metrics, workload, str(destination))
        found[f"policy {Path(path).stem}"] = str(destination)
    return found


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    torch.set_num_threads(deploy.THREADS)
    report = _common.environment(command, [0])
    workload = resolve_workload(args.workload)
    baseline = workload.load_baseline().eval()
    prompt = workload.example_inputs(1)["input_ids"][:, : args.prompt]
    rows = []
    with _common.scratch() as scratch:
        for name, source in sources(args.run, args.policy, workload, Path(scratch)).items():
            model = _load(source, workload)
            rows.append({
                "name": name, "source": source, "test": workload.evaluate(model, "test", "cpu"),
                "kl_from_baseline": kl_from_baseline(model, baseline, workload),
                "cache_equals_no_cache": generates_alike(model, prompt, args.new_tokens),
                **speed(model, baseline, prompt, args.rounds),
                "peak_rss_mb": None if args.quick else peak_rss_mb(args.workload, source, args.new_tokens),
            })  # fmt: skip
    settings = {"workload": args.workload, "prompt": args.prompt, "new_tokens": args.new_tokens, "rounds": args.rounds}
    return report | {"bench": "lm_decode", "metric": workload.metric_name, **settings, "rows": rows}


def table(rows: list[dict[str, Any]], metric: str) -> str:
    def cell(part: dict[str, Any]) -> str:
        s = part["speedup"]
        return f"{part['tokens_per_s']:.0f} tok/s, {s['median']:.2f}x [{s['low']:.2f}-{s['high']:.2f}]"

    header = ("model", f"test {metric}", "KL", "prefill", "decode", "cache ok", "peak MiB")
    lines = [(r["name"], f"{r['test']:.4f}", f"{r['kl_from_baseline']:.4f}", cell(r["prefill"]),
              cell(r["decode"]), str(r["cache_equals_no_cache"]),
              "—" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}") for r in rows]  # fmt: skip
    return _common.markdown_table(header, lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default=WORKLOAD, help=f"a causal LM workload (default {WORKLOAD})")
    parser.add_argument("--run", help="a finished `lm` search's run directory: its Pareto checkpoints")
    parser.add_argument("--policy", action="append", default=[], help="a policy JSON applied to the baseline")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill length, decode context)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated for the cache and memory checks")
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds per model and phase")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, no memory processes")
    parser.add_argument("--out", type=Path, help="JSON output (default docs/bench/lm_decode.json)")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # the memory child process
    args = parser.parse_args(argv)
    if args.peak_of:
        return _peak_main(args.workload, args.peak_of, args.new_tokens)
    args.rounds = 3 if args.quick else args.rounds
    command = _common.command_line("lm_decode", argv)
    out = args.out or _common.default_out("docs/bench/lm_decode.json", args.quick)
    start = time.perf_counter()
    try:
        report = run(args, command)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["wall_s"] = round(time.perf_counter() - start, 1)
    _common.write_json(out, report)
    print(f"{command}\n{_common.header_line(report)}\n\n{table(report['rows'], report['metric'])}")
    print(f"\nwrote {out} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where one search trial's time goes on the pretrained benchmark model (issue #24, item 6).

    python -m bench.trial_profile                    # bench.minilm, 4-bit + 50 distillation steps, onnxruntime target
    python -m bench.trial_profile --policy FILE --target torch --out /tmp/profile.json

Runs what a trial runs, in the order `orchestrator/search/trial.py` runs it, in one process and one thread: the
trial's setup shipped as Ray ships it (a cloudpickle round trip of the workload and the baseline's state), the
baseline rebuilt from that state, the reference measured for the target (once per worker process), then
`executor.apply` with an `on_epoch` callback (so the artifact is previewed before fine-tuning, as in a trial) and
the checkpoint written. Nothing in the trial code is changed: the functions it calls are wrapped with timers
for the run, and a layer's time is its own (what it calls is counted under the callee's label).

Decisions:
- Labels are the functions a trial spends its time in (`TIMED`), plus the teacher's forwards during distillation
  (hooks on the teacher object, which the student's deep copy carries too but ignores); what no label covers
  is "other" (the executor's own work, the optimiser's steps are inside the distillation label's own time).
- Each label says whether its work repeats identically in every trial of a search (same baseline, same data):
  that is what a cache could take out of a trial.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import _common, deploy
from orchestrator.errors import UserError
from orchestrator.policy import Policy

WORKLOAD = "bench.minilm:make_workload"
DEFAULT_POLICY = (("quantization", {"bits": {"_default": 4}, "activation_bits": None}),
                  ("distillation", {"steps": 50, "epochs": 0, "lr": 1e-4}))  # fmt: skip
TEACHER = "teacher forward (distillation)"
DISTILL = "technique distillation"  # the label TIMED gives the distillation step
REFERENCE = "reference (once per worker process)"
# (module, attribute, label, repeats in every trial with the same baseline and data)
TIMED = (
    ("techniques", "apply_spec", "technique {}", False),
    ("orchestrator.workloads._workload", "Workload.evaluate", "torch metric on {}", False),
    ("orchestrator.workloads._workload", "Workload.unused_layers", "unused-layer search", True),
    ("orchestrator.measure.targets", "OnnxSession.evaluate", "ONNX session metric on {}", False),
    ("orchestrator.export._run", "export_model", "ONNX export + check", False),
    ("orchestrator.measure.targets", "_session", "ONNX Runtime session load", False),
    ("orchestrator.measure.measurements", "time_paired", "paired timing", False),
    ("orchestrator.measure.measurements", "time_latency", "unpaired timing", False),
    ("orchestrator.measure.measurements", "count_flops", "FLOPs count", False),
    ("orchestrator.measure.measurements", "measure_artifact", "checkpoint bytes (size)", False),
    ("orchestrator.executor", "finalized_copy", "finalize (preview copy)", False),
    ("orchestrator.executor", "finalize", "finalize", False),
    ("orchestrator.artifacts.store", "save", "checkpoint save", False),
)


@dataclasses.dataclass
class Timers:
    """Exclusive wall time per (phase, label): a label's time less that of the labels it called. The phase is
    set by the caller, and moves on by itself when distillation starts and ends."""

    own: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    calls: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    stack: list[list[Any]] = dataclasses.field(default_factory=list)  # [label, start, time in callees]
    phase: str = ""

    def enter(self, label: str) -> None:
        if label == DISTILL:
            self.phase = "apply: fine-tune"
        self.stack.append([label, time.perf_counter(), 0.0])

    def enter_under(self, label: str, parent: str) -> None:
        """Enter `label` only when called straight from `parent` (a pair with `exit_from`)."""
        if self.stack and self.stack[-1][0] == parent:
            self.enter(label)

    def exit_from(self, label: str) -> None:
        if self.stack and self.stack[-1][0] == label:
            self.exit()

    def exit(self) -> None:
        label, start, inner = self.stack.pop()
        spent = time.perf_counter() - start
        key = (self.phase, label)
        self.own[key] = self.own.get(key, 0.0) + spent - inner
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.stack:
            self.stack[-1][2] += spent
        if label == DISTILL:
            self.phase = "apply: after fine-tune"

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        self.enter(label)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(label.format(_detail(args, kwargs)) if "{}" in label else label):
                return function(*args, **kwargs)

        return timed


def _detail(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """What a label's `{}` names: a technique step's name, or an evaluation's split."""
    for value in (*args, *kwargs.values()):
        if hasattr(value, "technique"):
            return str(value.technique)
    split = kwargs.get("split", next((a for a in args if isinstance(a, str)), "validation"))
    return str(split)


@contextlib.contextmanager
def instrumented(timers: Timers, teacher: nn.Module) -> Iterator[None]:
    """Every function in TIMED wrapped with a timer, and the teacher's forwards timed, for the block."""
    import importlib

    restore = []
    for module_name, attribute, label, _ in TIMED:
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        restore.append((owner, name, original))
        setattr(owner, name, timers.wrap(original, label))
    hooks = [  # the student (a deep copy) carries these hooks too: only the teacher's own forwards count
        teacher.register_forward_pre_hook(lambda m, a: timers.enter_under(TEACHER, DISTILL) if m is teacher else None),
        teacher.register_forward_hook(lambda m, a, o: timers.exit_from(TEACHER) if m is teacher else None),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


def trial(workload: Any, policy: Policy, target: str, batch: int, timers: Timers) -> dict[str, Any]:
    """One trial's work as trial.py does it (see the module's docstring); the outcome's metrics."""
    import cloudpickle

    from orchestrator import executor
    from orchestrator.artifacts import store
    from orchestrator.measure import measure_reference

    state = workload.load_baseline().state_dict()
    timers.phase = "setup"
    with timers("ship setup (cloudpickle round trip)"):
        workload, state = cloudpickle.loads(cloudpickle.dumps((workload, state)))
    with timers("baseline from state"):
        baseline = workload.build_model()
        baseline.load_state_dict(state)
        baseline.eval()
    device = torch.device("cpu")
    with instrumented(timers, baseline):
        timers.phase = REFERENCE
        with timers("measure_reference (own)"):
            reference = measure_reference(workload, baseline, device, latency_batch_size=batch, target=target)
        timers.phase = "apply: before fine-tune"
        with timers("apply (executor's own)"):
            outcome = executor.apply(policy, workload, device=device, baseline=baseline, reference=reference,
                                     on_epoch=lambda *args: None, latency_batch_size=batch, target=target)  # fmt: skip
        timers.phase = "checkpoint"
        with tempfile.TemporaryDirectory() as tmp:
            store.save(outcome.model, policy, outcome.metrics, workload, str(Path(tmp) / "model"))
    return outcome.metrics


def breakdown(timers: Timers, wall: float) -> list[dict[str, Any]]:
    """(phase, label) rows in the order they ran, with seconds, share of the trial and calls; whether the work
    repeats identically in every trial (the setup, the reference, the teacher's forwards, TIMED's flags)."""
    same = {label.split("{")[0].strip() for _, _, label, again in TIMED if again} | {TEACHER}
    return [
        {"phase": phase, "label": label, "s": round(s, 2), "share": round(s / wall, 4),
         "calls": timers.calls[(phase, label)],
         "repeats_across_trials": phase in ("setup", REFERENCE) or any(label.startswith(k) for k in same)}
        for (phase, label), s in timers.own.items()
    ]  # fmt: skip


def run(workload_name: str, policy: Policy, target: str, batch: int, command: str) -> dict[str, Any]:
    from orchestrator.workloads import resolve_workload

    torch.set_num_threads(deploy.THREADS)
    report = _common.environment(command, [policy.seed])
    started = time.perf_counter()
    workload = resolve_workload(workload_name)
    factory_s = time.perf_counter() - started  # the driver's, once per search
    timers = Timers()
    started = time.perf_counter()
    metrics = trial(workload, policy, target, batch, timers)
    wall = time.perf_counter() - started
    report |= {"bench": "trial_profile", "workload": workload_name, "target": target, "latency_batch_size": batch,
               "policy": policy.to_json(), "workload_factory_s": round(factory_s, 1), "trial_s": round(wall, 1),
               "breakdown": breakdown(timers, wall),
               "metrics": {k: v for k, v in metrics.items() if k not in ("kernels",)}}  # fmt: skip
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default=WORKLOAD, help=f"package.module:function (default {WORKLOAD})")
    parser.add_argument("--policy", help="a policy JSON file (default: 4-bit weights + 50 distillation steps)")
    parser.add_argument("--target", choices=("torch", "onnxruntime"), default="onnxruntime")
    parser.add_argument("--batch-size", type=int, default=1, help="the search's latency batch size")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/trial_profile_minilm.json"))
    args = parser.parse_args(argv)
    command = _common.command_line("trial_profile", argv)
    try:
        policy = Policy.load(args.policy) if args.policy else deploy.policy_of(*copy.deepcopy(DEFAULT_POLICY))
        report = run(args.workload, policy, args.target, args.batch_size, command)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _common.write_json(args.out, report)
    print(f"{command}\n{_common.header_line(report)}\ntrial {report['trial_s']:.1f} s\n")
    print(_common.markdown_table(
        ["phase", "where", "s", "share", "calls", "same in every trial"],
        [[r["phase"], r["label"], f"{r['s']:.1f}", f"{r['share']:.1%}", r["calls"],
          "yes" if r["repeats_across_trials"] else ""] for r in report["breakdown"] if r["s"] >= 0.05],
    ))  # fmt: skip
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

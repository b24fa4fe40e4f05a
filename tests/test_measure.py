"""Measurements are of the artifact and the model as they are."""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.artifacts.store import ARTIFACT_FILES, write_artifact
from orchestrator.files.weights import save_weights
from orchestrator.measure import (
    REPRODUCIBILITY,
    count_flops,
    count_weights,
    measure,
    measure_artifact,
    time_latency,
)
from orchestrator.search.config import SearchConfig


def test_size_is_the_bytes_of_the_files_written(tmp_path):
    model = nn.Linear(64, 32)
    written = save_weights(model, tmp_path / "m.safetensors")
    assert written == (tmp_path / "m.safetensors").stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    total = write_artifact(model, model, artifact)
    assert total == sum((artifact / name).stat().st_size for name in ARTIFACT_FILES) == measure_artifact(model)
    assert total > written  # the structure record counts too


def test_size_changes_when_the_artifact_changes():
    model = nn.Linear(64, 32)
    full = measure_artifact(model)
    assert measure_artifact(nn.Linear(64, 16)) < full
    assert measure_artifact(model.half()) < full
    # the tensor payload dominates: halving precision saves about half the weight bytes
    assert full - measure_artifact(model) >= 0.9 * (64 * 32 + 32) * 2


def test_counts_parameters_non_zeros_and_flops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[:5] = 0
    params, nonzero = count_weights(model)
    assert params == 10 * 20 + 20 + 20 * 5 + 5
    assert nonzero == params - 5 * 10
    assert count_flops(model, torch.randn(1, 10)) == 2 * (10 * 20 + 20 * 5)


def test_latency_and_environment_are_recorded():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
    latency = time_latency(model, torch.randn(4, 32), warmup=2, runs=7)
    assert latency.runs == 7 and latency.batch_size == 4
    assert 0 < latency.p10_ms <= latency.median_ms <= latency.p90_ms
    measured = measure(model, torch.randn(2, 32), warmup=1, runs=3)
    metrics = measured.metrics(reference=measured)
    assert metrics["device"] == "cpu" and metrics["threads"] == torch.get_num_threads()
    assert metrics["torch_version"] == torch.__version__
    assert metrics["size_bytes"] == measure_artifact(model) and metrics["compression_ratio"] == 1.0


class FakeClock:
    """A clock that moves only when a model it charges runs a forward: exact timings however busy the machine is."""

    def __init__(self) -> None:
        self.now = 0.0
        self.ran: list[str] = []  # which charged model ran each forward, in order

    def __call__(self) -> float:
        return self.now

    def charge(self, model: nn.Module, seconds: float, name: str) -> nn.Module:
        """`model`, each forward of which takes `seconds` on this clock (a power of two: sums stay exact)."""

        def tick(*_: object) -> None:
            self.now += seconds
            self.ran.append(name)

        model.register_forward_pre_hook(tick)
        return model


FAST_S, SLOW_S = 2.0**-11, 2.0**-8  # a 0.49 ms model beside a 3.9 ms baseline: exactly 8x faster


def test_paired_timing_reports_the_ratio_with_its_spread():
    """The arithmetic of paired timing, on a fake clock (how fast real models run here is bench/deploy.py's)."""
    from orchestrator.measure import MIN_BLOCK_S, time_paired

    clock = FakeClock()
    fast_model = clock.charge(nn.Linear(16, 8), FAST_S, "model")
    baseline = clock.charge(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)), SLOW_S, "baseline")
    x = torch.randn(4, 16)
    fast, slow, speedup = time_paired(fast_model, baseline, x, rounds=5, runs=5, warmup=3, clock=clock)
    assert (speedup.median, speedup.rounds) == (SLOW_S / FAST_S, 5) == (8.0, 5)
    assert (speedup.low, speedup.high) == (8.0 / (1 + REPRODUCIBILITY), 8.0 * (1 + REPRODUCIBILITY))  # no spread
    assert speedup.measurable
    assert (fast.median_ms, fast.p10_ms, fast.p90_ms) == (FAST_S * 1000,) * 3 and slow.median_ms == SLOW_S * 1000
    assert fast.batch_size == slow.batch_size == 4 and fast.warmup == 3
    # blocks last at least MIN_BLOCK_S: 52 forwards of the fast model, 7 of the slow one (above `runs`) per round
    per_block = {name: math.ceil(MIN_BLOCK_S / s) for name, s in [("model", FAST_S), ("baseline", SLOW_S)]}
    assert (fast.runs, slow.runs) == (5 * per_block["model"], 5 * per_block["baseline"]) == (5 * 52, 5 * 7)
    # each warmed up, then blocks in an order that flips every round, so both see the same moments of the machine
    expected = ["model"] * 3 + ["baseline"] * 3
    for index in range(5):
        for name in ("model", "baseline") if index % 2 == 0 else ("baseline", "model"):
            expected += [name] * per_block[name]
    assert clock.ran == expected
    big = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)], nn.Linear(512, 8))
    _, _, itself = time_paired(big, big, torch.randn(16, 512), rounds=3, runs=3)  # the real clock: exactly 1.0
    assert (itself.median, itself.low, itself.high) == (1.0, 1 / (1 + REPRODUCIBILITY), 1 + REPRODUCIBILITY)
    assert not itself.measurable


def test_latency_on_a_fake_clock_is_exact():
    clock = FakeClock()
    model = clock.charge(nn.Linear(8, 8), SLOW_S, "model")
    latency = time_latency(model, torch.randn(3, 8), warmup=2, runs=7, clock=clock)
    assert (latency.median_ms, latency.p10_ms, latency.p90_ms) == (SLOW_S * 1000,) * 3
    assert (latency.runs, latency.warmup, latency.batch_size) == (7, 2, 3) and len(clock.ran) == 9


def test_measurements_timed_beside_a_baseline_carry_the_paired_speedup():
    clock = FakeClock()
    model = clock.charge(nn.Linear(32, 8), FAST_S, "model")
    baseline = clock.charge(nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)], nn.Linear(32, 8)), SLOW_S, "base")
    measured = measure(model, torch.randn(4, 32), beside=baseline, clock=clock)
    metrics = measured.metrics(reference=measure(baseline, torch.randn(4, 32), clock=clock))
    assert metrics["speedup"] == measured.paired[1].median == 8.0
    assert metrics["speedup_low"] <= metrics["speedup"] <= metrics["speedup_high"]
    assert metrics["baseline_latency_ms"] == measured.paired[0].median_ms == SLOW_S * 1000
    assert metrics["latency_ms"] == FAST_S * 1000 and metrics["speedup_rounds"] == 7
    # the search's latency objective is this paired ratio (the model's time as a fraction of the baseline's)
    assert metrics["relative_latency"] == 1.0 / metrics["speedup"] == 0.125
    config = SearchConfig(objectives=("accuracy", "latency"))
    assert config.metric_keys == ("validation", "relative_latency") and config.directions()[1] == "minimize"


def test_re_timing_uses_the_recorded_thread_count_and_restores_it():
    from orchestrator.measure import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_a_timed_block_lasts_long_enough_for_one_busy_moment_to_miss_most_rounds():
    from orchestrator.measure.timing import MIN_BLOCK_S, _block_runs

    assert _block_runs([0.03, 0.01, 0.01], 20) == round(MIN_BLOCK_S * 1000 / 0.01)  # a 10 us model: 2,500 forwards
    assert _block_runs([100.0, 90.0], 20) == 20  # a slow model: the minimum count
    assert _block_runs([], 7) == 7


def paired_metrics(model_s: float, baseline_s: float) -> dict:
    """The metrics of a model whose forward takes `model_s` timed beside a baseline taking `baseline_s`, on a fake
    clock (as `evaluate` and a search's collect time them: paired rounds)."""
    clock = FakeClock()
    model = clock.charge(nn.Linear(16, 8), model_s, "model")
    baseline = clock.charge(nn.Linear(16, 8), baseline_s, "baseline")
    reference = measure(baseline, torch.randn(4, 16), clock=clock)
    measured = measure(model, torch.randn(4, 16), beside=baseline, clock=clock)
    return {**measured.metrics(reference), "target": "torch"}


def test_evaluate_says_whether_its_paired_re_timing_agrees_with_the_recorded_one():
    from orchestrator.measure import against_recorded

    recorded = paired_metrics(FAST_S, SLOW_S)  # 8x faster, spread +-5%
    assert against_recorded(recorded, paired_metrics(FAST_S, SLOW_S)) == {
        "recorded_speedup": [recorded["speedup_low"], 8.0, recorded["speedup_high"]],
        "agrees": True,
    }
    # the same checkpoint made 2x slower (or a machine that slows it alone): 4x, its spread apart from 8x's
    slower = paired_metrics(2 * FAST_S, SLOW_S)
    assert slower["speedup"] == 4.0 and slower["speedup_high"] < recorded["speedup_low"]
    assert against_recorded(recorded, slower)["agrees"] is False
    assert against_recorded(slower, recorded)["agrees"] is False
    # spreads that touch agree: 8x recorded as 7.0-13.2, re-timed 13.2-14.6
    touching = {**recorded, "speedup_low": 13.2, "speedup": 14.0, "speedup_high": 14.6}
    assert against_recorded({**recorded, "speedup_low": 7.0, "speedup_high": 13.2}, touching)["agrees"] is True
    assert against_recorded(recorded, {**slower, "latency_batch_size": 2}) == {}  # timed for another batch size
    assert against_recorded({**recorded, "speedup_low": None}, slower) == {}  # recorded without a spread
    assert against_recorded(recorded, {**slower, "speedup_high": None}) == {}  # re-timed without pairing
    from orchestrator.cli._format import _recorded

    said = _recorded({**slower, **against_recorded(recorded, slower)})
    assert said == [f"recorded speedup     8.00x, {recorded['speedup_low']:.2f}–8.40x; the two spreads DISAGREE"]


def test_every_name_the_measure_package_offers_resolves_lazily():
    import orchestrator.measure as package

    assert all(getattr(package, name) is not None for name in package.__all__)
    assert not hasattr(package, "no_such_name")

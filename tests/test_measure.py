"""Measurements are of the artifact and the model as they are."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.artifacts.store import ARTIFACT_FILES, measure_artifact, write_artifact
from orchestrator.artifacts.weights import save_weights
from orchestrator.measure import (
    REPRODUCIBILITY,
    count_flops,
    count_weights,
    drift_widened,
    latency_range,
    measure,
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


def test_paired_timing_reports_the_ratio_with_its_spread():
    from orchestrator.measure import time_paired

    torch.manual_seed(0)
    small = nn.Linear(64, 8)
    big = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)], nn.Linear(512, 8))
    x = torch.randn(16, 512)
    fast, slow, speedup = time_paired(nn.Sequential(nn.Linear(512, 64), small), big, x, rounds=5, runs=5)
    assert speedup.rounds == 5 and speedup.low <= speedup.median <= speedup.high
    assert speedup.median > 2 and speedup.measurable  # eight 512-wide layers against two small ones
    assert fast.median_ms < slow.median_ms and fast.runs % 5 == slow.runs % 5 == 0 and slow.runs >= 25
    assert fast.runs > slow.runs  # blocks last at least MIN_BLOCK_S: the faster model runs more forwards in each
    _, _, itself = time_paired(big, big, x, rounds=3, runs=3)  # a model beside itself: exactly no change
    assert (itself.median, itself.low, itself.high) == (1.0, 1 / (1 + REPRODUCIBILITY), 1 + REPRODUCIBILITY)
    assert not itself.measurable


def test_measurements_timed_beside_a_baseline_carry_the_paired_speedup():
    torch.manual_seed(0)
    model, baseline = nn.Linear(32, 8), nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)], nn.Linear(32, 8))
    measured = measure(model, torch.randn(4, 32), beside=baseline)
    metrics = measured.metrics(reference=measure(baseline, torch.randn(4, 32)))
    assert metrics["speedup"] == measured.paired[1].median
    assert metrics["speedup_low"] <= metrics["speedup"] <= metrics["speedup_high"]
    assert metrics["baseline_latency_ms"] == measured.paired[0].median_ms and metrics["speedup_rounds"] == 7
    # the search's latency objective is this paired ratio (the model's time as a fraction of the baseline's)
    assert metrics["relative_latency"] == 1.0 / metrics["speedup"] < 1.0
    config = SearchConfig(objectives=("accuracy", "latency"))
    assert config.metric_keys == ("validation", "relative_latency") and config.directions[1] == "minimize"


def test_re_timing_uses_the_recorded_thread_count_and_restores_it():
    from orchestrator.measure import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_a_spread_is_widened_by_how_far_the_baseline_moved_at_other_moments():
    # timed beside a baseline at 12 ms that ran anywhere from 9 to 14 ms over the run (twenty moments)
    moved = latency_range([9.0, 9.1, 13.0, None, float("nan"), 9.2, 13.5, 12.8, 9.0, 14.0, 13.1, 9.3] * 2)
    assert moved == (9.0, 14.0)  # the fastest and the 95th percentile; missing and non-finite times are ignored
    # a quiet machine's speed counts however rarely it was seen; slow moments rarer than one in twenty do not
    assert latency_range([8.0, 30.0] + [10.0] * 20) == (8.0, 10.0)
    low, high = drift_widened(9.5, 10.5, 12.0, moved)
    assert (low, high) == (9.5 * 9.0 / 12.0, 10.5 * 14.0 / 12.0)  # the ratios beside its faster and slower times
    assert drift_widened(9.5, 10.5, 12.0, (12.0, 12.0)) == (9.5, 10.5)  # a baseline that never moved
    assert drift_widened(9.5, 10.5, 8.0, (9.0, 10.0)) == (9.5, 10.5 * 10.0 / 8.0)  # never narrower than timed
    assert latency_range([None, 0.0]) is None


def test_a_timed_block_lasts_long_enough_for_one_busy_moment_to_miss_most_rounds():
    from orchestrator.measure import MIN_BLOCK_S, _block_runs

    assert _block_runs([0.03, 0.01, 0.01], 20) == round(MIN_BLOCK_S * 1000 / 0.01)  # a 10 us model: 2,500 forwards
    assert _block_runs([100.0, 90.0], 20) == 20  # a slow model: the minimum count
    assert _block_runs([], 7) == 7


def test_evaluate_compares_its_re_timing_with_the_recorded_spread_and_the_baselines_range():
    from orchestrator.evaluate import against_recorded

    recorded = {"target": "torch", "latency_batch_size": 256, "speedup_low": 7.0, "speedup": 9.2,
                "speedup_high": 13.2, "baseline_latency_range_ms": [10.5, 14.7]}  # fmt: skip
    now = {"target": "torch", "latency_batch_size": 256, "speedup": 14.8, "baseline_latency_ms": 16.1}
    assert against_recorded(recorded, now) == {
        "recorded_speedup": [7.0, 9.2, 13.2],
        "reproduced": False,  # the baseline runs slower than it ever did during the search
        "recorded_baseline_latency_range_ms": [10.5, 14.7],
    }
    assert against_recorded(recorded, {**now, "speedup": 9.0})["reproduced"]
    assert against_recorded(recorded, {**now, "latency_batch_size": 1}) == {}  # timed for another batch size
    assert against_recorded({**recorded, "speedup_low": None}, now) == {}  # recorded without a spread

"""Measurements are of the artifact and the model as they are."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.measure import count_flops, count_weights, measure_model, time_latency
from orchestrator.weights import artifact_bytes, save_weights


def test_size_is_the_bytes_of_the_file_written(tmp_path):
    model = nn.Linear(64, 32)
    written = save_weights(model, tmp_path / "m.safetensors")
    assert written == (tmp_path / "m.safetensors").stat().st_size == artifact_bytes(model)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_size_changes_when_the_artifact_changes():
    model = nn.Linear(64, 32)
    full = artifact_bytes(model)
    assert artifact_bytes(nn.Linear(64, 16)) < full
    assert artifact_bytes(model.half()) < full
    # the tensor payload dominates: halving precision saves about half the weight bytes
    assert full - artifact_bytes(model) >= 0.9 * (64 * 32 + 32) * 2


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
    assert 0 < latency.median_ms <= latency.p90_ms
    metrics = measure_model(model, torch.randn(2, 32), warmup=1, runs=3)
    assert metrics["device"] == "cpu" and metrics["threads"] == torch.get_num_threads()
    assert metrics["torch_version"] == torch.__version__
    assert metrics["size_bytes"] == artifact_bytes(model)

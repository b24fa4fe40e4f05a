"""The per-machine log of a baseline's latencies: kept across runs, keyed by what was timed, never a failure."""

from __future__ import annotations

import json
import multiprocessing
import shutil

import pytest
import torch
from torch import nn

from orchestrator.measure import latency_log
from tests.waiting import HANG_S


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path))
    return tmp_path


def _described(model: nn.Module, **changed):
    return latency_log.describe(model, **{"target": "torch", "batch_size": 1, "threads": 1, "device": "cpu", **changed})


def test_latencies_are_kept_in_order_and_read_back_before_a_moment(cache):
    torch.manual_seed(0)
    described = _described(nn.Linear(4, 2))
    latency_log.append(described, [2.0, None, float("nan"), -1.0, 3.0], at=100.0)  # invalid times are left out
    latency_log.append(described, [5.0], at=200.0)
    assert latency_log.observed(described) == [2.0, 3.0, 5.0]
    assert latency_log.observed(described, before=150.0) == [2.0, 3.0]
    written = json.loads(next((cache / "latency").glob("*.json")).read_text())
    assert written["baseline"] == described and written["samples"][-1] == [200.0, 5.0]


def test_a_log_is_of_one_baseline_timed_one_way_on_one_machine(cache):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    described = _described(model)
    assert described["machine"]["cores"] and described["machine"]["host"] is not None
    latency_log.append(described, [2.0])
    assert latency_log.observed(_described(model)) == [2.0]  # the same description, computed again
    others = [_described(model, target="onnxruntime"), _described(model, batch_size=256), _described(model, threads=2)]
    with torch.no_grad():
        model.weight[0, 0] += 1  # a retrained baseline
    others.append(_described(model))
    others.append(_described(model.to(torch.bfloat16)))  # the same weights in another dtype (numpy has no bf16)
    for other in others:
        assert latency_log.observed(other) == []
    assert len({latency_log.key_of(d) for d in [described, *others]}) == 6


def test_only_the_newest_samples_are_kept(cache, monkeypatch):
    monkeypatch.setattr(latency_log, "MAX_SAMPLES", 5)
    described = _described(nn.Linear(4, 2))
    latency_log.append(described, [float(ms) for ms in range(1, 5)], at=1.0)
    latency_log.append(described, [10.0, 11.0, 12.0], at=2.0)
    assert latency_log.observed(described) == [3.0, 4.0, 10.0, 11.0, 12.0]


def test_a_broken_or_unwritable_log_is_no_failure(cache):
    described = _described(nn.Linear(4, 2))
    (cache / "latency").mkdir()
    path = cache / "latency" / f"{latency_log.key_of(described)}.json"
    path.write_text('{"samples": [[1.0, "x"')  # cut short by a crash
    assert latency_log.observed(described) == []
    latency_log.append(described, [4.0])  # replaces it
    assert latency_log.observed(described) == [4.0]
    shutil.rmtree(cache / "latency")
    (cache / "latency").write_text("")  # a cache where no log can be written
    latency_log.append(described, [5.0])  # skipped
    assert latency_log.observed(described) == []


def _append_many(cache: str, described: dict, worker: int) -> None:
    import os

    os.environ["COMPRESSION_CACHE"] = cache
    for index in range(20):
        latency_log.append(described, [worker * 100.0 + index + 1])


def test_processes_appending_at_once_lose_nothing(cache):
    described = _described(nn.Linear(4, 2))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(cache), described, w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(HANG_S)
    assert [w.exitcode for w in workers] == [0] * 4, "None: a worker still running at the hang ceiling"
    assert sorted(latency_log.observed(described)) == sorted(w * 100.0 + i + 1 for w in range(4) for i in range(20))


def test_every_timing_of_a_baseline_is_logged(cache, digits, digits_baseline):
    from orchestrator.measure import compressed_metrics, measure_reference

    reference = measure_reference(digits, digits_baseline, torch.device("cpu"))
    assert latency_log.observed(reference.timings) == [reference.measurements.latency.median_ms]
    timed = compressed_metrics(digits_baseline, digits, torch.device("cpu"), reference, digits_baseline)
    assert latency_log.observed(reference.timings)[-1] == timed["baseline_latency_ms"]
    assert reference.timings["threads"] == torch.get_num_threads() and reference.timings["batch_size"] == 1

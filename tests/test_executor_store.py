"""Executor determinism and checkpoints that reload exactly, on the real digits workload."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.policy import Policy
from tests.test_policy import FULL
from tests.waiting import HANG_S

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def applied(digits, digits_baseline):
    return executor.apply(Policy.from_json(FULL), digits, baseline=digits_baseline)


@pytest.fixture(scope="module")
def saved(applied, digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    store.save(applied.model, applied.policy, applied.metrics, digits, str(path))
    return path


def test_all_four_families_compress_and_metrics_are_of_the_artifact(applied):
    metrics = applied.metrics
    assert metrics["techniques"] == [
        "lowrank",
        "structured_pruning",
        "unstructured_pruning",
        "quantization",
        "distillation",
    ]
    assert metrics["size_bytes"] * 5 < metrics["baseline_size_bytes"]
    assert metrics["compression_ratio"] == pytest.approx(metrics["baseline_size_bytes"] / metrics["size_bytes"])
    assert metrics["nonzero_params"] < metrics["params"]
    assert metrics["validation"] >= metrics["baseline_validation"] - 0.05
    assert set(metrics["kernels"]) >= {"conv1", "fc2"}


def test_size_bytes_is_the_sum_of_the_artifact_files(applied, saved):
    counted = sum((saved / name).stat().st_size for name in store.ARTIFACT_FILES)
    assert applied.metrics["size_bytes"] == counted
    manifest = json.loads((saved / store.MANIFEST).read_text())
    assert manifest["artifact_files"] == list(store.ARTIFACT_FILES)
    assert all(manifest["files"][name]["bytes"] == (saved / name).stat().st_size for name in manifest["files"])


def test_reload_in_a_fresh_process_gives_bitwise_equal_test_logits(applied, saved, digits, tmp_path):
    x = torch.cat([x for x, _ in digits.batches("test")])
    with torch.inference_mode():
        expected = applied.model(x)
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import save_file
        from orchestrator.artifacts import store
        from orchestrator.workloads import resolve_workload
        workload = resolve_workload("digits")
        checkpoint = store.load({str(saved)!r}, workload)
        x = torch.cat([x for x, _ in workload.batches("test")])
        with torch.inference_mode():
            save_file({{"logits": checkpoint.model(x)}}, {str(tmp_path / "logits.safetensors")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=os.environ, timeout=HANG_S)
    reloaded = load_file(tmp_path / "logits.safetensors")["logits"]
    assert torch.equal(reloaded, expected)


def test_apply_twice_with_one_seed_gives_identical_metrics_and_weight_files(applied, digits, digits_baseline, tmp_path):
    again = executor.apply(Policy.from_json(FULL), digits, baseline=digits_baseline)

    def untimed(metrics):
        return {k: v for k, v in metrics.items() if "latency" not in k and not k.startswith("speedup")}

    assert untimed(again.metrics) == untimed(applied.metrics)
    store.save(applied.model, applied.policy, applied.metrics, digits, str(tmp_path / "a"))
    store.save(again.model, again.policy, again.metrics, digits, str(tmp_path / "b"))
    for name in store.ARTIFACT_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_different_seed_gives_a_different_model(applied, digits, digits_baseline):
    other = executor.apply(Policy.from_json(FULL), digits, baseline=digits_baseline, seed=1)
    a, b = applied.model.state_dict(), other.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _copy(saved, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def test_flipped_byte_and_missing_file_name_the_file(saved, digits, tmp_path):
    damaged = _copy(saved, tmp_path)
    data = bytearray((damaged / store.WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / store.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(store.CheckpointError, match="model.safetensors is corrupted"):
        store.load(str(damaged), digits)
    (damaged / store.WEIGHTS).write_bytes((saved / store.WEIGHTS).read_bytes())
    (damaged / store.STRUCTURE).unlink()
    with pytest.raises(store.CheckpointError, match="structure.json is missing"):
        store.load(str(damaged), digits)


def test_saving_over_an_existing_checkpoint_is_refused(applied, saved, digits):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(store.CheckpointError, match="already exists"):
        store.save(applied.model, applied.policy, applied.metrics, digits, str(saved))
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_checkpoints_round_trip_through_a_pyarrow_filesystem_uri(applied, digits, tmp_path):
    uri = f"file://{tmp_path}/remote/model"
    store.save(applied.model, applied.policy, applied.metrics, digits, uri)
    checkpoint = store.load(uri, digits)
    x = digits.example_inputs(16)
    with torch.inference_mode():
        assert torch.equal(checkpoint.model(x), applied.model(x))


def test_weights_of_unknown_module_type_are_refused(saved, digits, tmp_path):
    damaged = _copy(saved, tmp_path)
    structure = json.loads((damaged / store.STRUCTURE).read_text())
    structure["modules"][0]["type"] = "os.system"
    (damaged / store.STRUCTURE).write_text(json.dumps(structure))
    manifest = json.loads((damaged / store.MANIFEST).read_text())
    data = (damaged / store.STRUCTURE).read_bytes()
    manifest["files"][store.STRUCTURE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (damaged / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(store.CheckpointError, match="unknown module type 'os.system'"):
        store.load(str(damaged), digits)

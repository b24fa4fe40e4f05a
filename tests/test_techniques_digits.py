"""Acceptance claims of each technique family on the real digits baseline (sizes, parameters, accuracy).

Policies and settings come from `bench/techniques_digits.py`, which reports the same claims with latency;
speed is a benchmark's business, not a timed test's.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.techniques_digits import (
    MAX_KD_GAP,
    MAX_W4_SIZE_RATIO,
    MIN_LOWRANK_DROP,
    MIN_STRUCTURED_DROP,
    POLICIES,
    factored_params,
    unfinalized,
    validation_logits,
)
from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.measure import Reference, count_weights, measure_reference

pytestmark = pytest.mark.slow

Apply = Callable[[str], executor.CompressedModel]


@pytest.fixture(scope="module")
def reference(digits, digits_baseline) -> Reference:
    return measure_reference(digits, digits_baseline, torch.device("cpu"))


@pytest.fixture(scope="module")
def apply_row(digits, digits_baseline, reference) -> Apply:
    """Apply a bench row's policy once per module (several tests share a result)."""
    results: dict[str, executor.CompressedModel] = {}

    def apply(name: str) -> executor.CompressedModel:
        if name not in results:
            results[name] = executor.apply(POLICIES[name], digits, baseline=digits_baseline, reference=reference)
        return results[name]

    return apply


def test_half_the_channels_pruned_cuts_parameters_and_bytes_by_at_least_40_percent(apply_row, reference):
    pruned = apply_row("structured-50")
    model, metrics = pruned.model, pruned.metrics
    assert [model.conv1.out_channels, model.conv2.out_channels, model.conv3.out_channels] == [16, 32, 32]
    assert (model.fc1.out_features, model.fc2.out_features) == (64, 10)  # the output layer keeps its classes
    assert count_weights(model)[0] == metrics["params"] <= (1 - MIN_STRUCTURED_DROP) * reference.measurements.params
    assert metrics["size_bytes"] <= (1 - MIN_STRUCTURED_DROP) * reference.measurements.size_bytes
    assert metrics["flops"] <= (1 - MIN_STRUCTURED_DROP) * reference.measurements.flops


@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
def test_weight_only_checkpoints_reload_to_the_fake_quant_logits_bitwise(
    bits, apply_row, digits, digits_baseline, tmp_path
):
    name = f"w{bits}"
    applied = apply_row(name)
    fake_quant = unfinalized(POLICIES[name], digits, digits_baseline)
    store.save(applied.model, applied.policy, applied.metrics, digits, str(tmp_path / name))
    reloaded = store.load(str(tmp_path / name), digits).model
    expected = validation_logits(fake_quant, digits)
    assert torch.equal(validation_logits(applied.model, digits), expected)
    assert torch.equal(validation_logits(reloaded, digits), expected)
    accuracy = digits.evaluate(fake_quant, "validation")
    assert digits.evaluate(reloaded, "validation") == applied.metrics["validation"] == accuracy


def test_4_bit_artifact_is_at_most_a_fifth_of_fp32_and_fewer_bits_are_smaller(apply_row, reference):
    sizes = [apply_row(f"w{bits}").metrics["size_bytes"] for bits in (8, 6, 4, 3, 2)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert apply_row("w4").metrics["size_bytes"] <= MAX_W4_SIZE_RATIO * reference.measurements.size_bytes


def test_8_bit_activations_run_the_int8_kernel_on_the_linear_layers(apply_row, reference):
    metrics = apply_row("w8a8").metrics
    assert metrics["kernels"] == {
        "conv1": "dequantized-fp32",
        "conv2": "dequantized-fp32",
        "conv3": "dequantized-fp32",
        "fc1": "int8_int_mm",
        "fc2": "int8_int_mm",
    }
    assert metrics["validation"] >= reference.metric - 0.01


def test_svd_and_tucker_at_rank_half_cut_the_factored_layers_parameters_by_45_percent(apply_row, digits_baseline):
    factored = apply_row("svd+tucker-0.5")
    layers = factored_params(digits_baseline, factored.model)
    assert sorted(layers) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    before = sum(b for b, _ in layers.values())
    after = sum(a for _, a in layers.values())
    assert after <= (1 - MIN_LOWRANK_DROP) * before
    noted = {n["layer"]: (n["params_before"], n["params_after"]) for n in factored.notes if "params_after" in n}
    assert noted == layers


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_80_percent_sparsity_recovers_within_one_point_with_2_epochs_of_distillation(scope, apply_row, reference):
    without = apply_row(f"unstructured-80-{scope}").metrics
    tuned = apply_row(f"unstructured-80-{scope}+kd").metrics
    assert without["nonzero_params"] == tuned["nonzero_params"] <= 0.21 * without["params"]
    assert reference.metric - without["validation"] > MAX_KD_GAP
    assert reference.metric - tuned["validation"] <= MAX_KD_GAP

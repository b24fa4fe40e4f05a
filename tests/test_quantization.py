"""Quantization technique: the shared contract, fake-quant arithmetic, STE gradients, calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import techniques
from orchestrator.testing import TechniqueContract, make_context
from techniques.fake_quant import ActivationFakeQuant, WeightFakeQuant
from techniques.packed.finalize import finalize
from techniques.quantization import MAX_GROUP_SIZE, QuantizationSpec
from tests.tiny_models import DictInputNet, TinyCNN, dict_data, seeded


class TestQuantizationContract(TechniqueContract):
    bad_spec_data = [
        {"bits": 1},
        {"bits": 7},
        {"bits": {"fc1": 32}},
        {"bits": True},
        {"bits": "8"},
        {"bits": 8, "group_size": 0},
        {"bits": 8, "group_size": 2.5},
        {"bits": 8.0},  # integral floats are not bit-widths (8.0 used to pass and crash in packing)
        {"bits": {"fc1": 4.0, "_default": 8}},
        {"bits": 16.0},
        {"bits": float("nan")},
        {"bits": float("inf")},
        {"bits": 8, "group_size": 8.0},
        {"bits": 8, "group_size": MAX_GROUP_SIZE + 1},
        {"bits": 8, "group_size": 10**30},
        {"bits": 8, "group_size": True},
        {"bits": 8, "group_size": float("nan")},
        {"bits": 8, "activation_bits": 8.0},
        {"bits": 8, "activation_bits": True},
        {"bits": 8, "activation_bits": 4},
        {"bits": 8, "kernel": "fast"},
        {"bits": 8, "unknown": 1},
        {"bits": {"re:[": 4}},
    ]

    edge_spec_data = [
        {"bits": 2},
        {"bits": 16},
        {"bits": 2, "group_size": 1},
        {"bits": 16, "group_size": 1, "activation_bits": 8},
        {"bits": 2, "activation_bits": 8, "kernel": "dequantize"},
        {"bits": {"conv1": 2, "conv2": 16, "fc1": None, "_default": 8}, "activation_bits": 8},
    ]

    def make_spec(self) -> techniques.TechniqueSpec:
        return QuantizationSpec(bits={"conv1": 8, "re:fc.*": 4, "_default": 6})


def _quantize(model: nn.Module, **spec: object) -> nn.Module:
    return techniques.apply_spec(model, QuantizationSpec(**spec), make_context())


def test_error_names_bad_value_and_layer() -> None:
    with pytest.raises(techniques.SpecError, match=r"'fc1'.*got 7"):
        QuantizationSpec(bits={"fc1": 7, "_default": 8})


def test_fake_quant_weights_use_few_levels_per_channel() -> None:
    model = _quantize(seeded(TinyCNN), bits={"fc1": 3, "fc2": 16})
    weight = model.fc1.weight.detach()
    original = model.fc1.parametrizations.weight.original.detach()
    for row, raw in zip(weight, original, strict=True):
        scale = raw.abs().max() / 3
        assert len(row.unique()) <= 7
        assert torch.allclose(row.abs().max(), raw.abs().max())
        assert (row - raw).abs().max() <= scale / 2 + 1e-6
    assert torch.equal(model.fc2.weight, model.fc2.parametrizations.weight.original.half().float())
    assert not parametrize.is_parametrized(model.conv1)


def test_group_size_gives_one_scale_per_group() -> None:
    model = _quantize(seeded(TinyCNN), bits={"fc1": 2}, group_size=64)
    groups = model.fc1.weight.detach().view(32, 4, 64)
    raw = model.fc1.parametrizations.weight.original.detach().view(32, 4, 64)
    assert torch.allclose(groups.abs().amax(dim=2), raw.abs().amax(dim=2))
    assert (groups.abs().amax(dim=2) != groups.abs().amax(dim=(1, 2), keepdim=True).squeeze(2)).any()


def test_group_size_must_divide_rows_and_error_names_layer() -> None:
    with pytest.raises(techniques.SpecError, match=r"row length 9 of layer 'conv1'"):
        _quantize(seeded(TinyCNN), bits=4, group_size=8)


def test_unaddressed_layer_stays_float_and_none_skips() -> None:
    model = _quantize(seeded(TinyCNN), bits={"fc1": None, "_default": 4})
    assert not parametrize.is_parametrized(model.fc1)
    assert parametrize.is_parametrized(model.fc2)


def test_quantising_twice_is_rejected() -> None:
    model = _quantize(seeded(TinyCNN), bits=4)
    with pytest.raises(techniques.SpecError, match="already quantised"):
        _quantize(model, bits=8)


def test_straight_through_gradient_reaches_original_weights() -> None:
    model = _quantize(seeded(TinyCNN), bits=4, activation_bits=8).train()
    x = make_context().example_inputs.requires_grad_(True)
    model(x).square().sum().backward()
    for layer in (model.conv1, model.fc1, model.fc2):
        grad = layer.parametrizations.weight.original.grad
        assert grad is not None and grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_quantises_on_top_of_a_weight_mask() -> None:
    model = seeded(TinyCNN)
    keep = torch.rand_like(model.fc1.weight) > 0.5
    parametrize.register_parametrization(model.fc1, "weight", techniques.WeightMask(keep))
    _quantize(model, bits={"fc1": 4})
    chain = model.fc1.parametrizations.weight
    assert [type(step) for step in chain] == [techniques.WeightMask, WeightFakeQuant]
    assert (model.fc1.weight[~keep] == 0).all()


def test_activation_scale_is_calibrated_max_over_calibration_data() -> None:
    model = seeded(TinyCNN)
    ctx = make_context()
    techniques.apply_spec(model, QuantizationSpec(bits={"conv1": 8}, activation_bits=8), ctx)
    observer = model.conv1.input_quant
    assert isinstance(observer, ActivationFakeQuant) and not observer.observing
    amax = max(float(batch.abs().max()) for batch in ctx.calibration())
    assert observer.scale.item() == pytest.approx(amax / 127)
    x = ctx.example_inputs
    with torch.no_grad():
        quantized = observer(x)
    assert len((quantized / observer.scale).round().unique()) <= 255
    assert torch.allclose(quantized, x, atol=observer.scale.item() / 2 + 1e-7)


def test_calibration_runs_the_model_on_dict_batches() -> None:
    inputs, _ = dict_data(32)
    batches = [{key: value[i : i + 8] for key, value in inputs.items()} for i in range(0, 32, 8)]
    ctx = techniques.Context(example_inputs=batches[0], calibration=lambda: iter(batches))
    model = techniques.apply_spec(seeded(DictInputNet), QuantizationSpec(bits=8, activation_bits=8), ctx)
    assert model.conv.input_quant.scale.item() == pytest.approx(float(inputs["image"].abs().max()) / 127)
    assert model.extra.input_quant.scale.item() == pytest.approx(float(inputs["extra"].abs().max()) / 127)


def test_integral_float_bits_and_large_group_size_are_spec_errors() -> None:
    QuantizationSpec(bits=8, group_size=MAX_GROUP_SIZE)  # the bound itself is valid
    with pytest.raises(techniques.SpecError, match=r"bits for layer 'fc1'.*got 8\.0"):
        QuantizationSpec(bits={"fc1": 8.0})
    with pytest.raises(techniques.SpecError, match=r"activation_bits must be 8 or null, got 8\.0"):
        QuantizationSpec(bits=8, activation_bits=8.0)
    with pytest.raises(techniques.SpecError, match=rf"group_size must be an integer in \[1, {MAX_GROUP_SIZE}\]"):
        QuantizationSpec(bits=8, group_size=MAX_GROUP_SIZE + 1)


# --------------------------------------------------------------------------- the integer kernel in the search


def test_the_search_offers_the_integer_kernel_as_a_per_layer_bits_choice(tmp_path) -> None:
    from orchestrator.artifacts.store import STRUCTURE, WEIGHTS, read_artifact, write_artifact
    from orchestrator.search.space import build_space
    from orchestrator.search.space_options import options_from_json
    from techniques.packed.finalize import kernel_report
    from techniques.packed.layers import DEQUANT_KERNEL, INT_KERNEL
    from techniques.quantization import W8A8

    assert W8A8 in techniques.get("quantization").search.per_layer.choices
    space = build_space(TinyCNN())
    assert W8A8 in space.choices["bits"]
    assert space.policy({"families": "quantization", **{f"bits.{g}": W8A8 for g in space.groups["quantization"]}})
    assert options_from_json({"choices": {"bits": [4, W8A8, 32]}}).choices["bits"] == (4, W8A8, 32)
    with pytest.raises(techniques.SpecError, match="w8a8"):
        QuantizationSpec(bits={"fc1": "w8a4"})

    ctx = make_context()
    model = techniques.apply_spec(seeded(TinyCNN), QuantizationSpec(bits={"re:.*": W8A8, "fc2": 4}), ctx)
    assert hasattr(model.fc1, "input_quant") and not hasattr(model.fc2, "input_quant")  # per layer, not global
    with torch.no_grad():
        fake = model.eval()(ctx.example_inputs)
    final = finalize(model).eval()
    kernels = kernel_report(final)
    assert kernels["fc1"] == INT_KERNEL  # a true int8 x int8 GEMM
    assert kernels["conv1"] == kernels["fc2"] == DEQUANT_KERNEL  # no integer kernel there: decoded float32
    assert "Linear layers only" in final.conv1.kernel_reason and "bits=4" in final.fc2.kernel_reason
    with torch.no_grad():
        assert torch.allclose(final(ctx.example_inputs), fake, atol=1e-4)
    write_artifact(final, TinyCNN(), tmp_path)
    reloaded = read_artifact((tmp_path / STRUCTURE).read_bytes(), (tmp_path / WEIGHTS).read_bytes(), TinyCNN())
    assert kernel_report(reloaded) == kernels
    with torch.no_grad():
        assert torch.equal(reloaded(ctx.example_inputs), final(ctx.example_inputs))

    dequantized = techniques.apply_spec(seeded(TinyCNN), QuantizationSpec(bits=W8A8, kernel="dequantize"), ctx)
    fallback = finalize(dequantized)
    assert kernel_report(fallback)["fc1"] == DEQUANT_KERNEL and "requested" in fallback.fc1.kernel_reason

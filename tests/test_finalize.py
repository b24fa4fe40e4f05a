"""Finalize: packed layers reproduce fake-quant bitwise, shrink the artifact, reload without pickles."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import techniques
from orchestrator.files.weights import load_weights, save_weights
from orchestrator.measure import count_weights, measure_artifact
from orchestrator.testing import make_context
from techniques.packed.finalize import finalize, integer_layers, kernel_report
from techniques.packed.layers import PackedConv2d, PackedLinear
from techniques.quantization import QuantizationSpec
from tests.tiny_models import TinyCNN, seeded


class MLP(nn.Module):
    """Big enough that weights, not biases or headers, dominate the artifact."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class OddConvs(nn.Module):
    """Grouped, strided, reflect-padded convolutions with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding="valid", groups=4, dilation=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).flatten(1)


def _quantized(model_cls: type[nn.Module] = TinyCNN, **spec: object) -> nn.Module:
    return techniques.apply_spec(seeded(model_cls), QuantizationSpec(**spec), make_context())


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(make_context().example_inputs)


def _mask_all(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    masks = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            masks[name] = torch.rand(layer.weight.shape, generator=gen) >= sparsity
            parametrize.register_parametrization(layer, "weight", techniques.WeightMask(masks[name]))
    return masks


def _rebuild(final: nn.Module, model_cls: type[nn.Module]) -> nn.Module:
    """A fresh model with packed layers rebuilt from JSON configs, loaded from a safetensors round trip."""
    fresh = seeded(model_cls, seed=99)
    types = techniques.module_types()
    for name, module in final.named_modules():
        if hasattr(module, "rebuild_config"):
            config = json.loads(json.dumps(module.rebuild_config()))
            techniques.set_module(fresh, name, types[type(module).__name__].from_rebuild_config(config))
    fresh.load_state_dict(final.state_dict(), strict=True)
    return fresh


SPECS = [
    {"bits": {"conv1": 8, "re:fc.*": 4, "_default": 6}},
    {"bits": {"conv1": 2, "conv2": 3, "fc1": 5, "fc2": 16}},
    {"bits": {"re:fc.*": 4, "conv2": 8}, "group_size": 8},
    {"bits": 8, "activation_bits": 8, "kernel": "dequantize"},
    {"bits": 6, "activation_bits": 8},
]


@pytest.mark.parametrize("spec", SPECS)
def test_finalized_outputs_equal_fake_quant_bitwise(spec: dict) -> None:
    model = _quantized(**spec)
    before = _outputs(model)
    final = finalize(model)
    assert torch.equal(_outputs(final), before)
    for module in final.modules():
        assert not parametrize.is_parametrized(module)
        assert not module._forward_pre_hooks and not hasattr(module, "input_quant")
    assert "dequantized-fp32" in kernel_report(final).values()
    assert "int8_int_mm" not in kernel_report(final).values()


def test_conv_geometry_survives_packing_and_reload() -> None:
    model = _quantized(OddConvs, bits=4, activation_bits=8)
    before = _outputs(model)
    final = finalize(model)
    assert isinstance(final.a, PackedConv2d) and final.a.padding_mode == "reflect" and final.b.groups == 4
    assert torch.equal(_outputs(final), before)
    assert torch.equal(_outputs(_rebuild(final, OddConvs)), before)


def test_bytes_scale_with_bits() -> None:
    fp32 = measure_artifact(seeded(MLP))
    sizes = {bits: measure_artifact(finalize(_quantized(MLP, bits=bits))) for bits in (16, 8, 6, 4, 3, 2)}
    assert sizes[4] <= 0.2 * fp32
    assert fp32 > sizes[16] > sizes[8] > sizes[6] > sizes[4] > sizes[3] > sizes[2]
    assert sizes[2] <= 0.11 * fp32


def test_reload_from_rebuild_config_reproduces_outputs_bitwise(tmp_path) -> None:
    model = seeded(TinyCNN)
    _mask_all(model, 0.8)
    spec = QuantizationSpec(bits={"conv1": 8, "fc1": 3, "fc2": 16}, activation_bits=8)
    final = finalize(techniques.apply_spec(model, spec, make_context()))
    expected = _outputs(final)
    assert final.fc1.sparse and final.conv2.bits == 32 and final.fc2.act_scale.item() > 0
    rebuilt = _rebuild(final, TinyCNN)
    save_weights(final, tmp_path / "w.safetensors")
    rebuilt.load_state_dict(load_weights(tmp_path / "w.safetensors"), strict=True)
    assert torch.equal(_outputs(rebuilt), expected)
    assert kernel_report(rebuilt) == kernel_report(final)


def test_mask_and_quantization_store_fewer_bytes_and_keep_zeros() -> None:
    quant_only = finalize(_quantized(MLP, bits=4))
    model = seeded(MLP)
    masks = _mask_all(model, 0.8)
    combined = finalize(techniques.apply_spec(model, QuantizationSpec(bits=4), make_context()))
    assert measure_artifact(combined) < 0.7 * measure_artifact(quant_only)
    for name, keep in masks.items():
        layer = combined.get_submodule(name)
        assert isinstance(layer, PackedLinear) and layer.sparse and layer.nnz == int(keep.sum())
        assert (layer.dense_weight()[~keep] == 0).all()


def test_pruned_only_layers_are_sparse_when_that_saves_bytes() -> None:
    dense_model, sparse_model = seeded(MLP), seeded(MLP)
    _mask_all(dense_model, 0.02)
    masks = _mask_all(sparse_model, 0.9)
    before = _outputs(sparse_model)
    dense, sparse = finalize(dense_model), finalize(sparse_model)
    assert type(dense.fc2) is nn.Linear
    assert isinstance(sparse.fc2, PackedLinear) and sparse.fc2.bits == 32 and sparse.fc2.sparse
    assert torch.equal(_outputs(sparse), before)
    assert measure_artifact(sparse) < 0.2 * measure_artifact(dense)
    assert torch.equal(sparse.fc2.dense_weight() != 0, masks["fc2"] & (dense_model.fc2.weight != 0))


def test_torch_prune_masks_are_stored_sparsely() -> None:
    model = seeded(MLP)
    prune.l1_unstructured(model.fc2, "weight", amount=0.9)
    before = _outputs(model)
    final = finalize(model)
    assert isinstance(final.fc2, PackedLinear) and final.fc2.sparse
    assert torch.equal(_outputs(final), before)


def test_int8_linear_runs_int_mm_close_to_fake_quant(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _quantized(MLP, bits=8, activation_bits=8)
    before = _outputs(model)
    final = finalize(model)
    assert kernel_report(final) == {name: "int8_int_mm" for name in ("fc1", "fc2", "fc3")}
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.dtype) or real(a, b))
    after = _outputs(final)
    assert calls == [torch.int8] * 3
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert integer_layers(_rebuild(final, MLP)) == ["fc1", "fc2", "fc3"]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"bits": 8}, "act_bits=None"),
        ({"bits": 4, "activation_bits": 8}, "bits=4"),
        ({"bits": 8, "activation_bits": 8, "group_size": 32}, "grouped"),
        ({"bits": 8, "activation_bits": 8, "kernel": "dequantize"}, "requested"),
    ],
)
def test_layers_without_an_integer_kernel_say_why(spec: dict, reason: str) -> None:
    final = finalize(_quantized(MLP, **spec))
    assert final.fc1.kernel == "dequantized-fp32" and reason in final.fc1.kernel_reason


def test_count_weights_on_packed_layers_matches_the_original() -> None:
    base = seeded(TinyCNN)
    final = finalize(_quantized(bits=4))
    assert count_weights(final)[0] == count_weights(base)[0]
    assert count_weights(final)[1] <= count_weights(final)[0]


def test_unquantized_model_is_left_plain() -> None:
    model = seeded(TinyCNN)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    final = finalize(model)
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in (final.conv1, final.conv2, final.fc1, final.fc2))
    assert all(torch.equal(state[k], v) for k, v in final.state_dict().items())
    assert set(kernel_report(final).values()) == {"fp32"}

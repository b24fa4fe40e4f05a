"""Activation-aware smoothing (techniques.smoothing, quantization `smoothing`): SmoothQuant's scales are the paper's
formula, smoothing alone leaves the model unchanged, it lowers w8a8's error where inputs have outlier channels, AWQ
never loses to round-to-nearest, and a smoothed model is the same through fake-quant → finalize → checkpoint →
ONNX."""

from __future__ import annotations

import json
import math

import onnx
import pytest
import torch
from torch import nn

import techniques
from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.export._check import TOLERANCE, compare, onnx_outputs, reference_outputs
from orchestrator.export._onnx import export_onnx
from orchestrator.files.weights import load_weights, save_weights
from orchestrator.policy import Policy
from orchestrator.search.space import build_space
from orchestrator.testing import make_context
from techniques import smoothing
from techniques.gptq import hessian_hooks
from techniques.packed.finalize import finalize
from techniques.packed.layers import PackedLinear, dequantize, fake_quantize_rows, weight_codes
from techniques.quantization import QuantizationSpec
from tests.tiny_models import TinyCNN, seeded, text_data, tiny_bert

# --------------------------------------------------------------------------- tiny layers with outlier inputs


class MLP(nn.Module):
    """Two Linear layers on 1x8x8 inputs (tiny_data), the first input scaled to have outlier channels."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, width), nn.Linear(width, 10)
        gain = torch.ones(64)
        gain[[3, 17, 40]] = 40.0  # a transformer's few outlier channels, much larger than the rest
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1) * self.gain)))


def _outlier_layer(seed: int = 0, n: int = 256) -> tuple[nn.Linear, torch.Tensor]:
    """A seeded Linear(64 -> 32) and n inputs whose channels 3, 17 and 40 are 40x the others."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=gen) * 0.1)
    x = torch.randn(n, 64, generator=gen)
    x[:, [3, 17, 40]] *= 40
    return layer, x


def _context(x: torch.Tensor) -> techniques.Context:
    ctx = make_context()
    ctx.example_inputs, ctx.calibration = x[:4], lambda: x.split(64)
    return ctx


def _quantized(layer: nn.Module, x: torch.Tensor, **spec) -> nn.Module:
    """`layer` (a Linear) quantised by `spec`, calibrated on `x`, inside a Sequential (layers are addressed by name)."""
    return techniques.apply_spec(nn.Sequential(layer), QuantizationSpec(**spec), _context(x))


def _mse(model: nn.Module, reference: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x) - reference).pow(2).mean())


def _bert_batch(n: int = 16) -> dict[str, torch.Tensor]:
    return text_data(n, seed=3)[0]


def _bert_context(batch: dict[str, torch.Tensor]) -> techniques.Context:
    ctx = make_context()
    ctx.example_inputs = {key: value[:4] for key, value in batch.items()}
    ctx.calibration = lambda: [batch]
    return ctx


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


# --------------------------------------------------------------------------- the arithmetic


def test_smoothquant_scales_equal_the_formula_on_a_tiny_layer():
    layer, x = _outlier_layer()
    x[:, 5] = 0  # an input never seen: s = 1
    with torch.no_grad():
        layer.weight[:, 9] = 0  # a dead weight column: s = max|X_9|
    w = layer.weight.detach().clone()
    model = _quantized(layer, x, bits="w8a8", smoothing="smoothquant", smoothing_alpha=0.7)
    found = 1.0 / model[0].input_smoothing.scale
    assert torch.allclose(layer.parametrizations.weight.original, w * found, rtol=1e-6)  # W·diag(s) is stored
    for j in range(64):
        act = max(abs(float(v)) for v in x[:, j])
        wmax = max(abs(float(v)) for v in w[:, j])
        if act == 0:
            expected = 1.0
        elif wmax == 0:
            expected = act
        else:
            expected = max(act**0.7 / max(wmax, 1e-5) ** 0.3, 1e-5)
        assert math.isclose(float(found[j]), expected, rel_tol=1e-5), j
    assert float(found[5]) == 1.0 and math.isclose(float(found[9]), float(x[:, 9].abs().max()), rel_tol=1e-6)


def test_smoothing_alone_leaves_the_model_unchanged():
    model, batch = tiny_bert(), _bert_batch()
    expected = _logits(model, batch)
    linears = dict(techniques.layers_of(model, (nn.Linear,)))
    with smoothing.statistics_hooks(linears, 64) as statistics, torch.no_grad():
        model(**batch)
    found = statistics()
    for name, layer in linears.items():
        stats = found[name]
        assert stats is not None and stats.sample is not None and 0 < len(stats.sample) <= 64
        scale = smoothing.smoothquant_scales(stats.amax, layer.weight, 0.5)
        assert float((scale - 1).abs().max()) > 0.5  # a real rescaling, not the identity
        smoothing.install(layer, layer.weight, scale)
    assert torch.allclose(_logits(model, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", ["w8a8", "w8a8-dynamic"])
def test_smoothquant_lowers_w8a8_error_on_outlier_channels(bits):
    layer, x = _outlier_layer()
    reference = layer(x).detach()
    plain = _mse(_quantized(_outlier_layer()[0], x, bits=bits), reference, x)
    smoothed = _mse(_quantized(_outlier_layer()[0], x, bits=bits, smoothing="smoothquant"), reference, x)
    assert smoothed < 0.7 * plain


def _rtn(weight: torch.Tensor, bits: int = 4, group: int | None = 16) -> torch.Tensor:
    return dequantize(*weight_codes(weight, bits, group), weight.shape)


def test_awq_error_is_at_most_round_to_nearest_and_alpha_zero_is_round_to_nearest():
    layer, x = _outlier_layer(n=512)
    weight = layer.weight.detach()
    stats = smoothing.InputStats(x.abs().amax(0), x.abs().mean(0), x)
    scale, alpha, errors = smoothing.awq_search(weight, stats, _rtn)
    rtn_error = float((x @ weight.t() - x @ _rtn(weight).t()).pow(2).mean())
    assert torch.equal(smoothing.awq_scales(stats.mean, 0.0), torch.ones(64))
    assert errors[0] == pytest.approx(rtn_error, rel=1e-6)  # α = 0: s = 1, round to nearest
    assert min(errors) == errors[round(alpha * smoothing.AWQ_GRID)] <= rtn_error and alpha > 0
    assert smoothing.smoothed_error(weight, x, scale, _rtn, None) < 0.8 * rtn_error
    only_zero = smoothing.awq_search(weight, stats, _rtn, grid=1)
    assert torch.equal(only_zero[0], torch.ones(64)) and only_zero[1] == 0.0


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_awq_through_the_technique_beats_round_to_nearest(algorithm):
    layer, x = _outlier_layer(n=512)
    reference = layer(x).detach()
    spec = {"bits": 4, "group_size": 16, "algorithm": algorithm}
    plain = _mse(_quantized(_outlier_layer()[0], x, **spec), reference, x)
    ctx = _context(x)
    awq = techniques.apply_spec(nn.Sequential(_outlier_layer()[0]), QuantizationSpec(**spec, smoothing="awq"), ctx)
    assert _mse(awq, reference, x) < plain
    assert ctx.notes[-1]["smoothing"] == "awq" and 0 < ctx.notes[-1]["smoothing_alpha"] < 1


def test_the_hessian_of_smoothed_inputs_is_the_scaled_hessian():
    layer, x = _outlier_layer()
    scale = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5
    with hessian_hooks({"layer": layer}) as plain, torch.no_grad():
        layer(x)
    with hessian_hooks({"layer": layer}) as scaled, torch.no_grad():
        layer(x / scale)
    assert torch.allclose(smoothing.scaled_hessian(plain()["layer"], scale), scaled()["layer"], rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- through the pipeline

PIPELINE = [
    {"bits": "w8a8", "smoothing": "smoothquant", "kernel": "dequantize"},
    {"bits": "w8a8-dynamic", "smoothing": "smoothquant", "smoothing_alpha": 0.8, "kernel": "dequantize"},
    {"bits": 4, "group_size": 16, "smoothing": "awq", "algorithm": "gptq"},
]


@pytest.mark.parametrize("spec", PIPELINE)
def test_fake_quant_equals_finalize_bitwise(spec):
    batch = _bert_batch()
    model = techniques.apply_spec(tiny_bert(), QuantizationSpec(**spec), _bert_context(batch))
    before = _logits(model, batch)
    final = finalize(model)
    assert torch.equal(_logits(final, batch), before)
    packed = [m for m in final.modules() if isinstance(m, PackedLinear)]
    smoothed = [m for m in packed if m.smoothed]  # AWQ leaves a layer whose best alpha is 0 as it is
    assert len(smoothed) > len(packed) / 2 and all(m.input_scale.shape == (m.in_features,) for m in smoothed)
    assert not any(isinstance(m, smoothing.InputSmoothing) for m in final.modules())


def test_the_integer_kernel_stays_close_to_fake_quant():
    batch = _bert_batch()
    model = techniques.apply_spec(
        tiny_bert(), QuantizationSpec(bits="w8a8", smoothing="smoothquant"), _bert_context(batch)
    )
    before = _logits(model, batch)
    final = finalize(model)
    assert "int8_int_mm" in {m.kernel for m in final.modules() if isinstance(m, PackedLinear)}
    assert torch.allclose(_logits(final, batch), before, atol=1e-3)


def test_save_reload_is_bitwise(tmp_path):
    batch = _bert_batch()
    spec = QuantizationSpec(bits="w8a8-dynamic", smoothing="smoothquant")
    final = finalize(techniques.apply_spec(tiny_bert(), spec, _bert_context(batch)))
    expected = _logits(final, batch)
    save_weights(final, tmp_path / "w.safetensors")
    fresh = finalize(
        techniques.apply_spec(tiny_bert(seed=7), QuantizationSpec(bits="w8a8-dynamic"), _bert_context(batch))
    )
    for name, module in final.named_modules():
        if isinstance(module, PackedLinear):
            config = json.loads(json.dumps(module.rebuild_config()))
            assert config["smoothed"] is True
            techniques.set_module(fresh, name, PackedLinear.from_rebuild_config(config))
    fresh.load_state_dict(load_weights(tmp_path / "w.safetensors"), strict=True)
    assert torch.equal(_logits(fresh, batch), expected)


def _policy(**data) -> Policy:
    step = {"_type": "quantization", "_version": 1, "_data": data}
    return Policy.from_json({"_type": "policy", "_version": 1, "seed": 0, "steps": [step]})


def test_executor_checkpoint_reloads_bitwise(tmp_path):
    from orchestrator.api import workload_from
    from tests.tiny_models import tiny_data

    x, y = tiny_data(96, seed=0)
    workload = workload_from(model=seeded(MLP), train=(x[:64], y[:64]), validation=(x[64:], y[64:]))
    policy = _policy(bits={"_default": 4}, group_size=16, smoothing="awq", algorithm="gptq")
    applied = executor.apply(policy, workload)
    assert sum(note.get("smoothing") == "awq" for note in applied.notes) == 2
    store.save(applied.model, applied.policy, applied.metrics, workload, str(tmp_path / "ckpt"))
    loaded = store.load(str(tmp_path / "ckpt"), workload)
    assert loaded.policy.steps[0].smoothing == "awq"
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), applied.model.eval()(x))


@pytest.mark.parametrize(
    "spec", [{"bits": "w8a8", "smoothing": "smoothquant"}, {"bits": 4, "group_size": 16, "smoothing": "awq"}]
)
def test_onnx_export_matches_the_torch_model_with_a_mul_before_each_layer(spec):
    batch = _bert_batch()
    final = finalize(techniques.apply_spec(tiny_bert(), QuantizationSpec(**spec), _bert_context(batch)))
    inputs = {key: value[:6] for key, value in batch.items()}
    written = export_onnx(final, inputs)
    check = compare([reference_outputs(final, inputs)], [onnx_outputs(written.data, inputs)], TOLERANCE)
    assert check["passed"], check
    graph = onnx.load_from_string(written.data).graph
    scales = {t.name for t in graph.initializer if t.name.endswith(".input_scale")}
    muls = [n for n in graph.node if n.op_type == "Mul" and set(n.input) & scales]
    smoothed = [r for r in written.layers if "inputs smoothed" in " ".join(r["notes"])]
    assert len(muls) == len(smoothed) == sum(isinstance(m, PackedLinear) and m.smoothed for m in final.modules())
    assert len(smoothed) > 2 * 6 / 2  # most of 6 Linear layers per block, 2 blocks, the pooler and the classifier


# --------------------------------------------------------------------------- notes, settings and search


def test_layers_smoothing_does_not_apply_to_are_noted_once():
    batch = _bert_batch()
    ctx = _bert_context(batch)
    bits = {"re:.*attention.*": "w8a8", "_default": 4}
    techniques.apply_spec(tiny_bert(), QuantizationSpec(bits=bits, smoothing="smoothquant"), ctx)
    weight_only = [n for n in ctx.notes if n["message"].startswith("not smoothed: SmoothQuant")]
    assert len(weight_only) == 1 and len(weight_only[0]["layers"]) == 2 * 2 + 2  # intermediate, output; pooler, head
    smoothed = [n["layer"] for n in ctx.notes if n.get("smoothing") == "smoothquant"]
    assert len(smoothed) == 2 * 4 and all("attention" in name for name in smoothed)


def test_masks_survive_smoothing():
    model = seeded(TinyCNN)
    keep = torch.rand(model.fc1.weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    torch.nn.utils.parametrize.register_parametrization(model.fc1, "weight", techniques.WeightMask(keep))
    ctx = make_context()
    final = finalize(techniques.apply_spec(model, QuantizationSpec(bits=4, smoothing="awq"), ctx))
    assert torch.all(final.fc1.decode_codes()[~keep] == 0) and final.fc1.smoothed
    assert any(n["message"] == "not smoothed: smoothing is for Linear layers" for n in ctx.notes)


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"smoothing": "gptq"}, "smoothing must be null or one of smoothquant, awq, got 'gptq'"),
        ({"smoothing": True}, "smoothing must be null or one of smoothquant, awq"),
        ({"smoothing": "smoothquant", "smoothing_alpha": 1.5}, r"smoothing_alpha must be in \[0.0, 1.0\]"),
        ({"smoothing": "smoothquant", "smoothing_alpha": -0.1}, r"smoothing_alpha must be in \[0.0, 1.0\]"),
        ({"smoothing_alpha": math.nan}, r"smoothing_alpha must be in \[0.0, 1.0\]"),
        ({"smoothing_alpha": "0.5"}, r"smoothing_alpha must be in \[0.0, 1.0\]"),
    ],
)
def test_bad_smoothing_settings_are_one_line_spec_errors(data, message):
    with pytest.raises(techniques.SpecError, match=message) as raised:
        techniques.spec_from_json({"_type": "quantization", "_version": 1, "_data": {"bits": "w8a8", **data}})
    assert "\n" not in str(raised.value)


def test_smoothing_a_model_without_linear_layers_is_a_spec_error():
    with pytest.raises(techniques.SpecError, match="model has none") as raised:
        techniques.apply_spec(seeded(ConvOnly), QuantizationSpec(bits=8, smoothing="awq"), make_context())
    assert "\n" not in str(raised.value)
    ctx = make_context()  # a model with Linear layers the policy leaves in float: noted, not refused
    techniques.apply_spec(seeded(TinyCNN), QuantizationSpec(bits={"conv1": 8}, smoothing="awq"), ctx)
    assert any("no quantised Linear layer to smooth" in n["message"] for n in ctx.notes)


def test_packed_linear_checks_smoothed():
    with pytest.raises(ValueError, match="smoothed must be a bool"):
        PackedLinear(8, 8, bits=8, smoothed="yes")  # type: ignore[arg-type]
    assert PackedLinear.from_rebuild_config({**PackedLinear(8, 8, bits=8).rebuild_config()}).smoothed is False


def test_search_offers_the_method_and_alpha():
    space = build_space(seeded(MLP))
    ranges = space.ranges["quantization"]
    assert ranges["smoothing"] == (None, "smoothquant", "awq") and ranges["smoothing_alpha"] == (0.3, 0.9)
    params = {"families": "quantization", **{f"bits.{g}": "w8a8" for g in space.groups["quantization"]}}
    params |= {"quantization.smoothing": "smoothquant", "quantization.smoothing_alpha": 0.65}
    step = space.policy(params).steps[0]
    assert step.smoothing == "smoothquant" and step.smoothing_alpha == 0.65
    references = {name: point for name, _, point in space.fixed_points()}
    assert all(point.get("quantization.smoothing", None) is None for point in references.values())


def test_dynamic_rows_after_smoothing_are_what_the_kernel_sees():
    layer, x = _outlier_layer()
    model = _quantized(layer, x, bits="w8a8-dynamic", smoothing="smoothquant", kernel="dequantize")
    inverse, weight = model[0].input_smoothing.scale, model[0].weight.detach()
    with torch.no_grad():
        expected = torch.nn.functional.linear(fake_quantize_rows(x * inverse), weight, model[0].bias)
        assert torch.equal(model(x), expected)


def test_the_example_policy_smooths_every_linear_and_keeps_embeddings_in_8_bits():
    from pathlib import Path

    policy = Policy.load(str(Path(__file__).parent.parent / "examples" / "policies" / "smoothquant_w8a8.json"))
    (step,) = policy.steps
    batch = _bert_batch()
    ctx = _bert_context(batch)
    final = finalize(techniques.apply_spec(tiny_bert(), step, ctx))
    linears = [m for m in final.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 2 * 6 + 2 and all(m.smoothed and m.act_bits == 8 and m.bits == 8 for m in linears)
    tables = [m for m in final.modules() if type(m).__name__ == "PackedEmbedding"]
    assert len(tables) == 3 and all(m.bits == 8 for m in tables)
    assert not any(step.technique == "distillation" for step in policy.steps)

"""W8A8 with dynamic per-row activations ("w8a8-dynamic"): fake-quant, the finalized `torch._int_mm` layer, its
per-row scales, the search space, checkpoints, and the ONNX / torch.export artifacts."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

import techniques
from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.export import export_model
from orchestrator.policy import Policy
from orchestrator.testing import make_context
from techniques.fake_quant import DynamicActivationFakeQuant
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.finalize import finalize, finalized_copy, integer_layers, kernel_report
from techniques.packed.layers import DEQUANT_KERNEL, INT_KERNEL, PackedConv2d, PackedLinear, row_scales
from techniques.quantization import W8A8, W8A8_DYNAMIC, QuantizationSpec
from tests.model_workloads import bert_workload
from tests.test_policy import policy_doc, step
from tests.tiny_models import TinyCNN, seeded

# One layer: the integer GEMM sums code products exactly, fake-quant sums (code x scale) products in float32; the
# two agree to float32 rounding of a K-term sum, a few ulps of the largest partial sum: 1e-5 relative and absolute.
KERNEL_RTOL = KERNEL_ATOL = 1e-5
# A stack: such an ulp in one layer's output can move the next layer's input across a rounding boundary, one
# activation quantisation step (max|row| / 127) in a few elements; held to 1e-2 of the largest output, as the
# export check holds graphs with quantised activations.
STACK_TOLERANCE = 1e-2


class Stack(nn.Module):
    """A BERT-sized stack of Linear layers on (batch, tokens, hidden) inputs."""

    def __init__(self, hidden: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _quantized(model: nn.Module, **spec: object) -> nn.Module:
    return techniques.apply_spec(model, QuantizationSpec(**spec), make_context())


def _tokens(seed: int = 0, hidden: int = 64) -> torch.Tensor:
    return torch.randn(2, 9, hidden, generator=torch.Generator().manual_seed(seed))


def test_the_search_offers_w8a8_dynamic_beside_static_w8a8() -> None:
    from orchestrator.search.space import build_space
    from orchestrator.search.space_options import options_from_json

    choices = techniques.get("quantization").search.per_layer.choices
    assert W8A8_DYNAMIC in choices and W8A8 in choices
    space = build_space(TinyCNN())
    assert W8A8_DYNAMIC in space.choices["bits"]
    groups = space.groups["quantization"]
    assert space.policy({"families": "quantization", **{f"bits.{g}": W8A8_DYNAMIC for g in groups}})
    assert options_from_json({"choices": {"bits": [W8A8_DYNAMIC, 32]}}).choices["bits"] == (W8A8_DYNAMIC, 32)
    with pytest.raises(techniques.SpecError, match="w8a8-dynamic"):
        QuantizationSpec(bits={"fc1": "w8a8-dyn"})


def test_no_calibration_runs_and_linear_layers_get_a_dynamic_fake_quant() -> None:
    ctx = make_context()
    ctx.calibration = lambda: pytest.fail("w8a8-dynamic needs no calibration")  # type: ignore[assignment]
    model = techniques.apply_spec(seeded(TinyCNN), QuantizationSpec(bits={"_default": W8A8_DYNAMIC}), ctx)
    assert isinstance(model.fc1.input_quant, DynamicActivationFakeQuant)
    assert not hasattr(model.conv1, "input_quant")  # Conv2d: 8-bit weights, float activations


def test_the_finalized_layer_runs_int_mm_and_matches_fake_quant(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _quantized(seeded(Stack), bits=W8A8_DYNAMIC)
    x = _tokens()
    with torch.no_grad():
        fake = model.eval()(x)
    final = finalized_copy(model).eval()
    assert kernel_report(final) == {f"layers.{i}": INT_KERNEL for i in range(3)}
    assert all(layer.act_dynamic and "act_scale" not in layer.state_dict() for layer in final.layers)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append((a.dtype, a.shape[0])) or real(a, b))
    with torch.no_grad():
        out = final(x)
    assert calls == [(torch.int8, 18)] * 3  # every token is a row of one integer GEMM
    assert (out - fake).abs().max() <= STACK_TOLERANCE * fake.abs().max()
    for packed, fake_layer in zip(final.layers, model.layers, strict=True):  # each layer on the same input
        inputs = _tokens(7)
        with torch.no_grad():
            torch.testing.assert_close(packed(inputs), fake_layer(inputs), rtol=KERNEL_RTOL, atol=KERNEL_ATOL)


def test_the_fallback_path_equals_fake_quant_bitwise_and_says_why() -> None:
    model = _quantized(seeded(Stack), bits=W8A8_DYNAMIC, kernel="dequantize")
    x = _tokens(1)
    with torch.no_grad():
        fake = model.eval()(x)
    final = finalize(model).eval()
    assert set(kernel_report(final).values()) == {DEQUANT_KERNEL}
    assert "requested" in final.layers[0].kernel_reason
    with torch.no_grad():
        assert torch.equal(final(x), fake)  # the same float arithmetic on the same per-row codes


def test_activations_pass_the_gradient_straight_through() -> None:
    model = _quantized(seeded(Stack, hidden=16, layers=1), bits=W8A8_DYNAMIC).train()
    x = _tokens(2, hidden=16).requires_grad_()
    model(x).sum().backward()
    layer = model.layers[0]
    with torch.no_grad():
        pre = layer(x)  # the layer's output, whose relu mask decides which gradients flow
    expected = ((pre > 0).float() @ layer.weight).detach()  # d/dx of relu(q(x) W^T + b) with dq/dx = 1
    torch.testing.assert_close(x.grad, expected)
    assert layer.parametrizations.weight.original.grad is not None


def test_per_row_scales_keep_ordinary_rows_precise_beside_an_outlier_row() -> None:
    gen = torch.Generator().manual_seed(3)
    layer = nn.Sequential(nn.Linear(64, 32))  # a named layer: the policy addresses layers by name
    x = torch.randn(16, 64, generator=gen)
    x[0] *= 1000.0  # one outlier token
    exact = layer(x).detach()
    dynamic = finalize(_quantized(copy.deepcopy(layer), bits=W8A8_DYNAMIC)).eval()
    calibrated_on_x = techniques.Context(example_inputs=x, calibration=lambda: [x])  # its max is the outlier
    static = techniques.apply_spec(copy.deepcopy(layer), QuantizationSpec(bits=W8A8), calibrated_on_x)
    static = finalize(static).eval()
    assert kernel_report(dynamic) == kernel_report(static) == {"0": INT_KERNEL}
    assert static[0].act_scale == x.abs().max() / 127
    assert row_scales(x).shape == (16, 1) and row_scales(x)[0] > 500 * row_scales(x)[1:].max()
    with torch.no_grad():
        ours, theirs = dynamic(x), static(x)
        alone = dynamic(x[1:])
    ordinary = slice(1, None)
    error = (ours[ordinary] - exact[ordinary]).abs().max() / exact[ordinary].abs().max()
    static_error = (theirs[ordinary] - exact[ordinary]).abs().max() / exact[ordinary].abs().max()
    assert error < 0.02 and static_error > 10 * error, (error, static_error)
    assert torch.equal(alone, ours[ordinary])  # a row's output does not depend on the other rows at all


def test_an_all_zero_row_gets_scale_one_and_zero_codes() -> None:
    x = torch.zeros(3, 8)
    x[1, 2] = 5.0
    assert torch.equal(row_scales(x).flatten(), torch.tensor([1.0, 5.0 / 127, 1.0]))
    layer = finalize(_quantized(nn.Sequential(nn.Linear(8, 8)), bits=W8A8_DYNAMIC)).eval()[0]
    assert isinstance(layer, PackedLinear)
    with torch.no_grad():
        assert torch.equal(layer(x)[0], layer.bias)


def test_packed_layers_check_act_dynamic() -> None:
    with pytest.raises(ValueError, match="act_dynamic"):
        PackedLinear(8, 8, bits=8, act_bits=None, act_dynamic=True)
    with pytest.raises(ValueError, match="act_dynamic"):
        PackedLinear(8, 8, bits=8, act_bits=8, act_dynamic="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Linear layers only"):
        PackedConv2d(3, 4, [3, 3], bits=8, act_bits=8, act_dynamic=True)
    config = PackedLinear(8, 8, bits=8, act_bits=8, act_dynamic=True).rebuild_config()
    assert config["act_dynamic"] is True and PackedLinear.from_rebuild_config(config).act_dynamic


def test_the_export_hook_runs_int_mm_like_forward() -> None:
    layer = finalize(_quantized(seeded(Stack), bits=W8A8_DYNAMIC)).layers[1]
    x = _tokens(4)
    assert torch.equal(layer.export_forward(x), layer(x))


# --------------------------------------------------------------------------- a transformer, end to end


@pytest.fixture(scope="module")
def bert_applied(tmp_path_factory):
    """Tiny BERT, w8a8-dynamic everywhere (embeddings: 8-bit rows), one distillation epoch, saved."""
    workload = bert_workload()
    doc = policy_doc(
        step("quantization", bits={"_default": W8A8_DYNAMIC}),
        step("distillation", epochs=1, lr=1e-4),
    )
    applied = executor.apply(Policy.from_json(doc), workload)
    path = tmp_path_factory.mktemp("ckpt") / "bert-dynamic"
    store.save(applied.model, applied.policy, applied.metrics, workload, str(path))
    return workload, applied, path


@pytest.mark.slow
def test_a_tiny_bert_finalizes_every_linear_to_int_mm_and_reloads_bitwise(bert_applied) -> None:
    workload, applied, path = bert_applied
    model = applied.model
    linears = [name for name, module in model.named_modules() if isinstance(module, PackedLinear)]
    assert len(linears) == 14 and integer_layers(model) == linears  # 2 x (q, k, v, out, ffn in, ffn out) + 2
    assert applied.metrics["kernels"]["bert.encoder.layer.0.attention.self.query"] == INT_KERNEL
    assert isinstance(model.bert.embeddings.word_embeddings, PackedEmbedding)
    reloaded = store.load(str(path), workload).model.eval()
    assert kernel_report(reloaded) == kernel_report(model)
    batch = workload.example_inputs(8)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model.eval()(**batch).logits)


@pytest.mark.slow
def test_onnx_runs_an_integer_gemm_per_linear_within_the_quantized_tolerance(bert_applied, tmp_path) -> None:
    workload, applied, _ = bert_applied
    result = export_model(applied.model, workload, out=tmp_path / "bert.onnx")
    check = result.report["check"]
    assert result.passed, check
    assert "activations are quantised" in check["tolerance_rule"]
    ops = [node.op_type for node in onnx.load(tmp_path / "bert.onnx").graph.node]
    assert ops.count("MatMulInteger") == 14 and ops.count("ReduceMax") >= 14
    dynamic = [layer for layer in result.report["layers"] if layer["op"] == "MatMulInteger"]
    assert len(dynamic) == 14 and all("dynamic per-row" in layer["kernel"] for layer in dynamic)
    assert all(layer["low_bit_kernel"] for layer in dynamic)


@pytest.mark.slow
def test_torch_export_keeps_int_mm_and_matches_exactly(bert_applied, tmp_path) -> None:
    workload, applied, _ = bert_applied
    result = export_model(applied.model, workload, out=tmp_path / "bert.pt2", format="torch-export")
    assert result.passed and result.report["check"]["max_abs_diff"] == 0.0


def test_a_fallback_layer_exports_its_per_row_fake_quant_to_onnx() -> None:
    from orchestrator.export._check import QUANTIZED_ACTIVATIONS_TOLERANCE, compare, onnx_outputs, reference_outputs
    from orchestrator.export._onnx import export_onnx

    model = finalize(_quantized(seeded(Stack), bits=W8A8_DYNAMIC, group_size=16)).eval()
    assert "grouped" in model.layers[0].kernel_reason
    x = _tokens(5)
    written = export_onnx(model, x)
    check = compare([reference_outputs(model, x)], [onnx_outputs(written.data, x)], QUANTIZED_ACTIVATIONS_TOLERANCE)
    assert check["passed"], check
    assert all("dynamic per-row 8-bit activations" in " ".join(r["notes"]) for r in written.layers)


@pytest.mark.gpu
def test_on_cuda_short_inputs_are_padded_for_int_mm_and_agree_with_the_cpu() -> None:
    layer = finalize(_quantized(seeded(Stack, hidden=64, layers=1), bits=W8A8_DYNAMIC)).layers[0].eval()
    for rows in (1, 5, 16, 17, 40):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            cpu = layer(x)
            gpu = copy.deepcopy(layer).cuda()(x.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=KERNEL_RTOL, atol=KERNEL_ATOL)

"""GPTQ (techniques.gptq, quantization `algorithm: "gptq"`): equal to the reference algorithm on a tiny layer, below
round-to-nearest's output error, exact through fake-quant → finalize → checkpoint → ONNX, and searchable."""

from __future__ import annotations

import copy
import json
import math

import onnx
import pytest
import torch
from torch import nn

import techniques
from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.export._check import compare, onnx_outputs, reference_outputs
from orchestrator.export._onnx import export_onnx
from orchestrator.files.weights import load_weights, save_weights
from orchestrator.policy import Policy
from orchestrator.search.space import build_space
from orchestrator.search.space_options import options_from_json
from orchestrator.testing import make_context
from techniques.fake_quant import WeightFakeQuant
from techniques.gptq import gptq_quantize, hessian_hooks
from techniques.packed.finalize import finalize
from techniques.packed.layers import PackedLinear, weight_codes
from techniques.quantization import QuantizationSpec, fitted_group_size, fitting_group_sizes
from tests.tiny_models import TinyCNN, seeded

# --------------------------------------------------------------------------- the reference, transcribed


class _SymmetricQuantizer:
    """The reference's `Quantizer` interface (`find_params`, `scale`, `quantize`) on the project's symmetric grid
    (scale = max|w| / (2^(b-1)-1), codes in +-(2^(b-1)-1)) instead of the reference's (scale 2·max|w| / (2^b-1),
    zero point 2^(b-1)); `found` records every scale found, in order."""

    def __init__(self, bits: int) -> None:
        self.qmax = 2 ** (bits - 1) - 1
        self.scale = torch.zeros(1)
        self.found: list[torch.Tensor] = []

    def ready(self) -> bool:
        return bool(torch.all(self.scale != 0))

    def find_params(self, x: torch.Tensor, weight: bool = True) -> None:
        x = x.flatten(1)
        tmp = torch.zeros(x.shape[0])
        xmax = torch.maximum(torch.abs(torch.minimum(x.min(1)[0], tmp)), torch.maximum(x.max(1)[0], tmp))
        self.scale = torch.where(xmax > 0, xmax / self.qmax, torch.ones_like(xmax)).reshape(-1, 1)
        self.found.append(self.scale[:, 0])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.clamp(torch.round(x / self.scale), -self.qmax, self.qmax)


def reference_fasterquant(W, H, bits, blocksize=128, percdamp=0.01, groupsize=-1, actorder=False, static_groups=False):
    """IST-DASLab/gptq `gptq.py` `GPTQ.fasterquant` (commit 9f2abd32533c83079847435a7c971bb4420285c8, unchanged at
    2d65066eeb06a5c9ff5184d8cebdf33662c67faf), transcribed as a function of the weight and the Hessian: the layer
    and timing/printing are dropped, the quantizer is `_SymmetricQuantizer`. Returns (Q, the quantizers' scales)."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    quantizer = _SymmetricQuantizer(bits)
    if not quantizer.ready():
        quantizer.find_params(W, weight=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            group = copy.deepcopy(quantizer)
            group.find_params(W[:, i : (i + groupsize)], weight=True)
            groups.append(group)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i) : (i1 + i + groupsize)], weight=True)
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]
            q = quantizer.quantize(w.unsqueeze(1)).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    found = [g.found[-1] for g in groups] if static_groups else quantizer.found[-(columns // groupsize) :]
    return Q, torch.stack(found, dim=1) if groupsize != -1 else quantizer.found[0][:, None]


# --------------------------------------------------------------------------- tiny seeded layers and data


def _layer_and_inputs(rows: int = 12, columns: int = 32, n: int = 96, seed: int = 0, dead: int | None = 5):
    """A seeded Linear and correlated inputs (a random mixing of a few strong directions), one input dead."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(columns, rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, columns, generator=gen))
    x = torch.randn(n, columns, generator=gen) @ torch.randn(columns, columns, generator=gen)
    x = x * torch.rand(columns, generator=gen) * 3
    if dead is not None:
        x[:, dead] = 0
    return layer, x


def _hessian(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with hessian_hooks({"layer": layer}) as hessians, torch.no_grad():
        for chunk in x.split(32):
            layer(chunk)
    found = hessians()["layer"]
    assert found is not None
    return found


def _gptq_weight(layer, x, bits, group=None, **knobs) -> torch.Tensor:
    codes, scale, _ = gptq_quantize(layer.weight, _hessian(layer, x), bits, group, **knobs)
    return (codes.reshape(codes.shape[0], scale.shape[1], -1) * scale[:, :, None]).reshape(layer.weight.shape)


def _rtn_weight(layer, bits, group=None) -> torch.Tensor:
    codes, scale = weight_codes(layer.weight.detach(), bits, group)
    return (codes * scale).reshape(layer.weight.shape)


def _output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ weight.detach().t() - x @ approx.t()))


def test_hessian_is_two_over_n_times_the_gram_matrix_of_the_inputs():
    layer, x = _layer_and_inputs()
    assert torch.allclose(_hessian(layer, x), 2 / len(x) * x.t() @ x, rtol=1e-5, atol=1e-4)


CASES = [
    {"bits": 4},  # per channel
    {"bits": 3, "groupsize": 8},  # groups start inside blocks of 16: the reference's scale timing
    {"bits": 4, "groupsize": 16, "actorder": True, "static_groups": True},
    {"bits": 2, "actorder": True},
    {"bits": 8, "groupsize": 32},
]


@pytest.mark.parametrize("case", CASES)
def test_codes_and_scales_equal_the_reference_fasterquant(case):
    layer, x = _layer_and_inputs()
    hessian = _hessian(layer, x)
    expected, expected_scales = reference_fasterquant(layer.weight.detach(), hessian, blocksize=16, **case)
    group = case.get("groupsize")
    codes, scales, damp = gptq_quantize(
        layer.weight, hessian, case["bits"], group, block_size=16, act_order=case.get("actorder", False)
    )
    assert damp == 0.01
    assert scales.shape == (12, 32 // (group or 32))
    assert torch.equal(scales, expected_scales)
    assert torch.equal((codes.reshape(12, scales.shape[1], -1) * scales[:, :, None]).reshape(12, 32), expected)
    assert codes.abs().max() <= 2 ** (case["bits"] - 1) - 1 and torch.all(codes[:, 5] == 0)  # the dead input


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [None, 16])
def test_gptq_output_error_is_below_round_to_nearest(bits, group):
    layer, x = _layer_and_inputs(rows=32, columns=64, n=256, dead=None)
    gptq, rtn = _gptq_weight(layer, x, bits, group), _rtn_weight(layer, bits, group)
    assert _output_error(x, layer.weight, gptq) < 0.9 * _output_error(x, layer.weight, rtn)


def test_act_order_keeps_groups_contiguous_and_changes_the_result():
    layer, x = _layer_and_inputs(rows=32, columns=64, n=256, dead=None)
    ordered = _gptq_weight(layer, x, 3, 16, act_order=True)
    assert not torch.equal(ordered, _gptq_weight(layer, x, 3, 16))
    # static groups: each contiguous group of 16 columns is quantised on the scale of the original weight's group
    expected = weight_codes(layer.weight.detach(), 3, 16)[1]
    codes, scales, _ = gptq_quantize(layer.weight, _hessian(layer, x), 3, 16, act_order=True)
    assert torch.equal(scales, expected[:, :, 0])
    assert _output_error(x, layer.weight, ordered) < _output_error(x, layer.weight, _rtn_weight(layer, 3, 16))


def test_pruned_weights_stay_zero():
    layer, x = _layer_and_inputs(rows=16, columns=32, n=128, dead=None)
    keep = torch.rand(16, 32, generator=torch.Generator().manual_seed(3)) > 0.5
    with torch.no_grad():
        layer.weight.mul_(keep)
    codes, _, _ = gptq_quantize(layer.weight, _hessian(layer, x), 4, 8, keep=keep)
    assert torch.all(codes[~keep] == 0) and torch.count_nonzero(codes[keep]) > 0.8 * keep.sum()


# --------------------------------------------------------------------------- through the pipeline


class MLP(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, width), nn.Linear(width, width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def _gptq_model(model: nn.Module, ctx: techniques.Context | None = None, **spec) -> nn.Module:
    spec = {"bits": 4, "algorithm": "gptq", **spec}
    return techniques.apply_spec(model, QuantizationSpec(**spec), ctx or make_context())


def _outputs(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(make_context().example_inputs if x is None else x)


def _packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, PackedLinear)}


def test_fake_quant_uses_gptq_scales_and_finalize_packs_them_bitwise():
    ctx = make_context()
    model = _gptq_model(seeded(MLP), ctx, group_size=16, act_order=True)
    assert [note["algorithm"] for note in ctx.notes] == ["gptq"] * 3
    quant = model.fc2.parametrizations.weight[0]
    assert isinstance(quant, WeightFakeQuant) and quant.scale is not None and quant.scale.shape == (256, 16)
    assert not torch.equal(quant.scale, weight_codes(model.fc2.parametrizations.weight.original, 4, 16)[1][:, :, 0])
    before = _outputs(model)
    final = finalize(model)
    assert torch.equal(_outputs(final), before)
    assert torch.equal(final.fc2.scale, quant.scale)


def test_apply_finalize_save_reload_is_bitwise(tmp_path):
    final = finalize(_gptq_model(seeded(MLP), group_size=32))
    expected = _outputs(final)
    save_weights(final, tmp_path / "w.safetensors")
    fresh = seeded(MLP, seed=99)
    for name, module in _packed_layers(final).items():
        config = json.loads(json.dumps(module.rebuild_config()))
        techniques.set_module(fresh, name, PackedLinear.from_rebuild_config(config))
    fresh.load_state_dict(load_weights(tmp_path / "w.safetensors"), strict=True)
    assert torch.equal(_outputs(fresh), expected)


def _policy(**spec) -> Policy:
    data = {"bits": {"_default": 4}, "group_size": 16, "algorithm": "gptq", "act_order": True, **spec}
    step = {"_type": "quantization", "_version": 1, "_data": data}
    return Policy.from_json({"_type": "policy", "_version": 1, "seed": 0, "steps": [step]})


def test_executor_checkpoint_reloads_bitwise(tmp_path):
    from orchestrator.api import workload_from
    from tests.tiny_models import tiny_data

    x, y = tiny_data(96, seed=0)
    workload = workload_from(model=seeded(MLP, width=64), train=(x[:64], y[:64]), validation=(x[64:], y[64:]))
    applied = executor.apply(_policy(), workload)
    assert any(note.get("algorithm") == "gptq" for note in applied.notes)
    store.save(applied.model, applied.policy, applied.metrics, workload, str(tmp_path / "ckpt"))
    loaded = store.load(str(tmp_path / "ckpt"), workload)
    assert loaded.policy.steps[0].algorithm == "gptq" and loaded.policy.steps[0].act_order
    assert torch.equal(_outputs(loaded.model, x), _outputs(applied.model, x))


def test_onnx_export_runs_matmulnbits_with_the_group_as_block():
    model = finalize(_gptq_model(seeded(MLP), bits={"fc2": 4, "fc3": 4}, group_size=128).eval())
    inputs = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    written = export_onnx(model, inputs)
    check = compare([reference_outputs(model, inputs)], [onnx_outputs(written.data, inputs)], 1e-4)
    assert check["passed"], check
    nodes = [n for n in onnx.load_from_string(written.data).graph.node if n.op_type == "MatMulNBits"]
    blocks = {attr.i for node in nodes for attr in node.attribute if attr.name == "block_size"}
    assert len(nodes) == 2 and blocks == {128}  # fc2 and fc3, in groups of 128


def test_fine_tuning_after_gptq_moves_weights_on_the_frozen_scales():
    teacher = seeded(MLP)
    ctx = make_context(teacher=teacher)
    model = _gptq_model(copy.deepcopy(teacher), ctx, group_size=16)
    scale = model.fc2.parametrizations.weight[0].scale.clone()
    original = model.fc2.parametrizations.weight.original.detach().clone()
    spec = techniques.get("distillation").spec_type(epochs=1, lr=1e-2)
    tuned = techniques.apply_spec(model, spec, ctx)
    assert not torch.equal(tuned.fc2.parametrizations.weight.original, original)
    assert torch.equal(tuned.fc2.parametrizations.weight[0].scale, scale)
    before = _outputs(tuned)
    assert torch.equal(_outputs(finalize(tuned)), before)


def test_masks_survive_and_embeddings_and_unrun_layers_are_noted():
    model = seeded(TinyCNN)
    masks = {}
    for name in ("fc1", "conv2"):
        layer = getattr(model, name)
        masks[name] = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", techniques.WeightMask(masks[name]))
    model.unused = nn.Linear(4, 4)
    ctx = make_context()
    ctx.calibration = None
    final = finalize(_gptq_model(model, ctx, bits={"re:(fc|conv).*": 4, "unused": 4}))
    for name in ("fc1", "conv2"):
        assert torch.all(getattr(final, name).decode_codes()[~masks[name]] == 0)
    messages = [note["message"] for note in ctx.notes]
    assert "no calibration data; GPTQ Hessians from example inputs" in messages
    assert "round to nearest, not GPTQ: the layer never ran during calibration" in messages


def test_embeddings_round_to_nearest_said_once():
    from tests.tiny_models import tiny_bert

    model = tiny_bert()
    ctx = make_context()
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    ctx.example_inputs, ctx.calibration = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None
    _gptq_model(model, ctx, bits=4)
    embedding_notes = [n for n in ctx.notes if "embeddings round to nearest" in n["message"]]
    assert len(embedding_notes) == 1 and len(embedding_notes[0]["layers"]) == 3
    assert sum(n.get("algorithm") == "gptq" for n in ctx.notes) == sum(
        isinstance(m, nn.Linear) for m in tiny_bert().modules()
    )


# --------------------------------------------------------------------------- settings and search


@pytest.mark.parametrize(
    "data, message",
    [
        ({"algorithm": "awq"}, "algorithm must be one of rtn, gptq"),
        ({"damp": 0}, r"damp must be a number in \(0, 1\]"),
        ({"damp": 1.5}, r"damp must be a number in \(0, 1\]"),
        ({"damp": True}, r"damp must be a number in \(0, 1\]"),
        ({"damp": math.nan}, r"damp must be a number in \(0, 1\]"),
        ({"act_order": "yes"}, "act_order must be true or false"),
        ({"block_size": 0}, r"block_size must be an integer in \[1, "),
        ({"block_size": 64.0}, r"block_size must be an integer in \[1, "),
    ],
)
def test_bad_gptq_settings_are_one_line_spec_errors(data, message):
    with pytest.raises(techniques.SpecError, match=message) as raised:
        techniques.spec_from_json({"_type": "quantization", "_version": 1, "_data": {"bits": 4, **data}})
    assert "\n" not in str(raised.value)


def test_old_policies_still_mean_round_to_nearest():
    spec = techniques.spec_from_json({"_type": "quantization", "_version": 1, "_data": {"bits": 4}})
    assert spec.algorithm == "rtn" and spec == QuantizationSpec(bits=4)
    model = techniques.apply_spec(seeded(MLP), spec, make_context())
    assert model.fc1.parametrizations.weight[0].scale is None
    assert "scale" not in "".join(model.state_dict())


def test_search_offers_algorithm_and_group_size():
    space = build_space(seeded(MLP))
    ranges = space.ranges["quantization"]
    assert ranges["algorithm"] == ("rtn", "gptq") and ranges["group_size"] == (None,)
    params = {"families": "quantization", **{f"bits.{g}": 4 for g in space.groups["quantization"]}}
    policy = space.policy({**params, "quantization.algorithm": "gptq", "quantization.group_size": None})
    assert policy.steps[0].algorithm == "gptq"
    options = options_from_json({"quantization": {"group_size": [None, 32, 64], "algorithm": ["gptq"]}})
    widened = build_space(seeded(MLP), options)
    assert widened.ranges["quantization"]["algorithm"] == ("gptq",)
    assert widened.ranges["quantization"]["group_size"] == (None, 32, 64)
    references = {name: params for name, _, params in widened.fixed_points()}
    assert references["uniform 4-bit"]["quantization.group_size"] is None


def test_fitting_group_sizes_divide_every_quantised_row():
    layers = list(techniques.layers_of(seeded(MLP), (nn.Linear,)))
    assert fitting_group_sizes(layers) == (None, 32, 64)  # fc1's rows are 64 long
    assert fitting_group_sizes(list(techniques.layers_of(seeded(TinyCNN), (nn.Linear, nn.Conv2d)))) == (None,)


@pytest.mark.parametrize("row, group, fitted", [(768, 128, 128), (192, 128, 64), (9, 128, None), (150, 100, 50)])
def test_fit_groups_halves_the_group_size_until_it_divides_the_row(row, group, fitted):
    assert fitted_group_size(row, group) == fitted
    assert fitted_group_size(24, 16) is None  # never below 16, the smallest MatMulNBits block


def test_fit_groups_lets_one_policy_fit_any_model():
    with pytest.raises(techniques.SpecError, match="fit_groups: true"):
        _gptq_model(seeded(TinyCNN), group_size=64)
    ctx = make_context()
    model = _gptq_model(seeded(TinyCNN), ctx, group_size=64, fit_groups=True)
    groups = {note["layer"]: note["group_size"] for note in ctx.notes if note["layer"]}
    assert groups == {"conv1": None, "conv2": None, "fc1": 64, "fc2": 32}
    assert "one scale per output channel: group_size 64 does not divide" in ctx.notes[0]["message"]
    before = _outputs(model)
    final = finalize(model)
    assert torch.equal(_outputs(final), before) and final.fc2.scale.shape == (10, 1)

"""Export keeps the compression: ONNX with low-bit operators (MatMulNBits, MatMulInteger, GatherBlockQuantized,
int4/int8 storage) and torch.export programs that keep the packed buffers, each checked against PyTorch."""

from __future__ import annotations

import copy
import itertools
import json

import onnx
import pytest
import torch
from torch import nn

import techniques
from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.cli import main
from orchestrator.errors import UserError
from orchestrator.export import export_checkpoint, export_model
from orchestrator.export._check import QUANTIZED_ACTIVATIONS_TOLERANCE, compare, onnx_outputs, reference_outputs
from orchestrator.export._onnx import export_onnx
from orchestrator.policy import Policy
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.finalize import finalize
from techniques.packed.layers import PackedConv2d, PackedLinear
from tests.model_workloads import bert_workload, dict_workload
from tests.test_policy import policy_doc, step


def _linear(bits: int, group: int | None = None, *, sparse: float = 0.0, act: float | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 64, generator=gen)
    mask = torch.rand(48, 64, generator=gen) >= sparse if sparse else None
    return PackedLinear.from_weight(
        weight, bits=bits, group_size=group, mask=mask, bias=torch.randn(48, generator=gen),
        act_scale=None if act is None else torch.tensor(act), kernel="auto", in_features=64, out_features=48,
    )  # fmt: skip


def _ops(data: bytes) -> list[str]:
    return [node.op_type for node in onnx.load_from_string(data).graph.node]


def _exported_matches(model: nn.Module, inputs, **options) -> tuple[bytes, list[dict], dict]:
    written = export_onnx(model, inputs, **options)
    check = compare([reference_outputs(model, inputs)], [onnx_outputs(written.data, inputs)], 1e-4)
    return written.data, written.layers, check


class _Chain(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(x) for layer in self.layers)


def test_every_linear_layout_runs_in_onnx_runtime_as_pytorch_computes_it():
    layers = [
        _linear(4), _linear(3, seed=1), _linear(2, 32, seed=2), _linear(5, 16, seed=3), _linear(2, 8, seed=4),
        _linear(8, act=0.02, seed=5), _linear(4, act=0.02, seed=6), _linear(16, seed=7),
        _linear(32, sparse=0.7, seed=8), _linear(4, sparse=0.5, seed=9),
    ]  # fmt: skip
    assert layers[5].kernel == "int8_int_mm"
    data, records, check = _exported_matches(_Chain(layers).eval(), torch.randn(5, 64))
    assert check["passed"], check
    ops = [record["op"] for record in records]
    assert ops == ["com.microsoft.MatMulNBits"] * 3 + ["MatMul", "MatMul", "MatMulInteger",
                   "com.microsoft.MatMulNBits", "MatMul", "MatMul", "com.microsoft.MatMulNBits"]  # fmt: skip
    assert [record["stored_bits"] for record in records] == [4, 4, 4, 8, 4, 8, 4, 16, 32, 4]
    assert "3-bit codes stored in 4 bits" in records[1]["notes"]
    assert not records[3]["low_bit_kernel"] and "dequantized to fp32 at load" in records[3]["kernel"]
    assert records[9]["sparsity"] >= 0.5 and "run dense" in records[9]["notes"][-1]
    assert "MatMulInteger" in _ops(data) and "Round" in _ops(data)


def test_int8_activations_use_matmulnbits_accuracy_level_4_within_a_looser_tolerance():
    model = _Chain([_linear(4), _linear(8, 16, seed=1)]).eval()  # grouped 8-bit scales: 8-bit MatMulNBits
    written = export_onnx(model, torch.randn(4, 64), int8_activations=True)
    levels = [
        a.i for n in onnx.load_from_string(written.data).graph.node for a in n.attribute if a.name == "accuracy_level"
    ]
    assert levels == [4, 4]
    inputs = torch.randn(6, 64)
    check = compare(
        [reference_outputs(model, inputs)], [onnx_outputs(written.data, inputs)], QUANTIZED_ACTIVATIONS_TOLERANCE
    )
    assert check["passed"] and check["max_abs_diff"] > 0


def _dynamic(seed: int) -> PackedLinear:
    gen = torch.Generator().manual_seed(seed)
    return PackedLinear.from_weight(
        torch.randn(48, 64, generator=gen), bits=8, group_size=None, mask=None, bias=torch.randn(48, generator=gen),
        act_scale=None, kernel="auto", act_dynamic=True, in_features=64, out_features=48,
    )  # fmt: skip


def test_int8_activations_run_8_bit_linears_in_ort_dynamic_quantize_matmul():
    layers = [_dynamic(0), _linear(8, seed=1), _linear(6, seed=2), _linear(8, 16, seed=3), _linear(8, act=0.02, seed=4)]
    model = _Chain(layers).eval()
    written = export_onnx(model, torch.randn(4, 64), int8_activations=True)
    ops = [record["op"] for record in written.layers]
    # per-channel 5-8-bit layers (dynamic or weight-only) run ORT's fused dynamic kernel; grouped scales take
    # 8-bit MatMulNBits; static activation scales keep the exact int8 graph
    assert ops == ["com.microsoft.DynamicQuantizeMatMul"] * 3 + ["com.microsoft.MatMulNBits", "MatMulInteger"]
    assert all(record["low_bit_kernel"] and record["stored_bits"] == 8 for record in written.layers)
    inputs = torch.randn(6, 64)
    check = compare(
        [reference_outputs(model, inputs)], [onnx_outputs(written.data, inputs)], QUANTIZED_ACTIVATIONS_TOLERANCE
    )
    assert check["passed"] and check["max_abs_diff"] > 0
    exact = export_onnx(model, torch.randn(4, 64))  # without the choice the graph computes as PyTorch does
    assert "DynamicQuantizeMatMul" not in _ops(exact.data)


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        specs = [
            (4, None, "zeros", None),
            (8, 9, "reflect", 0.05),
            (16, None, "zeros", None),
            (32, None, "zeros", None),
        ]
        self.convs = nn.ModuleList()
        for bits, group, mode, act in specs:
            weight = torch.randn(6, 3, 3, 3, generator=gen)
            mask = (torch.rand(weight.shape, generator=gen) > 0.8) if bits == 32 else None
            geometry = PackedConv2d.like(nn.Conv2d(3, 6, 3, padding=1, padding_mode=mode))
            self.convs.append(PackedConv2d.from_weight(
                weight, bits=bits, group_size=group, mask=mask, bias=torch.randn(6, generator=gen),
                act_scale=None if act is None else torch.tensor(act), kernel="auto", **geometry,
            ))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


def test_convolutions_keep_low_bit_storage_and_say_they_are_dequantized_at_load():
    _, records, check = _exported_matches(_Convs().eval(), torch.randn(3, 3, 8, 8))
    assert check["passed"], check
    assert [r["stored_bits"] for r in records] == [4, 8, 16, 32]
    assert all(not r["low_bit_kernel"] for r in records)
    assert "ORT has no low-bit convolution" in records[0]["kernel"]


def test_an_export_is_the_same_before_and_after_the_model_ran():
    """A forward caches decoded weights (non-persistent buffers); the exported file never depends on them."""
    convs, linear, images, rows = _Convs().eval(), _linear(4, act=None), torch.randn(2, 3, 8, 8), torch.randn(2, 64)
    before = export_onnx(convs, images).data, export_onnx(linear, rows).data
    with torch.inference_mode():
        convs(images), linear(rows)
    assert linear._dense is not None  # the cache the export must not see
    assert (export_onnx(convs, images).data, export_onnx(linear, rows).data) == before


class _Lookups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        specs = [(4, None), (2, None), (8, 16), (3, None), (6, 8), (16, None)]
        self.tables = nn.ModuleList(
            PackedEmbedding.from_weight(torch.randn(40, 32, generator=gen), bits=bits, group_size=group)
            for bits, group in specs
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return sum(table(ids) for table in self.tables)


def test_embeddings_gather_low_bit_rows():
    ids = torch.randint(0, 40, (4, 7), generator=torch.Generator().manual_seed(1))
    data, records, check = _exported_matches(_Lookups().eval(), ids)
    assert check["passed"], check
    assert [r["op"] for r in records] == ["com.microsoft.GatherBlockQuantized"] * 4 + ["Gather", "Gather"]
    assert [r["stored_bits"] for r in records] == [4, 2, 8, 4, 8, 16]
    assert _ops(data).count("GatherBlockQuantized") == 4


LAYOUTS = [(b, g, s) for b, g, s in itertools.product((2, 3, 4, 5, 8, 16, 32), (None, 8), (False, True)) if b < 32 or s]


@pytest.mark.parametrize("bits, group, sparse", LAYOUTS)  # float32 is packed only with a mask
def test_export_hooks_decode_what_forward_computes_bitwise(bits, group, sparse):
    layer = _linear(bits, group if bits < 16 else None, sparse=0.6 if sparse else 0.0)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer.decode_weight(), layer.dense_weight())
    assert torch.equal(layer.export_forward(x), layer(x))
    table = PackedEmbedding.from_weight(torch.randn(20, 16), bits=bits if bits < 32 else 16, group_size=group)
    ids = torch.randint(0, 20, (2, 9))
    assert torch.equal(table.export_forward(ids), table(ids))


def test_the_int8_kernel_export_hook_runs_int_mm_like_forward():
    layer = _linear(8, act=0.02)
    x = torch.randn(7, 64)
    assert torch.equal(layer.export_forward(x), layer(x))


# --------------------------------------------------------------------------- models with dict inputs


def _quantized(workload, doc: dict) -> tuple[nn.Module, Policy]:
    """The workload's baseline with the policy's steps applied and finalized (no fine-tuning, no measuring)."""
    policy = Policy.from_json(doc)
    teacher = workload.load_baseline()
    ctx = executor.make_context(workload, teacher, 0, torch.device("cpu"), None)
    model = copy.deepcopy(teacher)
    for spec in policy.steps:
        model = techniques.apply_spec(model, spec, ctx)
    return finalize(model).eval(), policy


@pytest.fixture(scope="module")
def bert():
    workload = bert_workload()
    return workload, _quantized(workload, policy_doc(step("quantization", bits={"_default": 4})))[0]


def test_tiny_bert_with_4_bit_weights_and_embeddings_exports_with_its_named_inputs(bert, tmp_path):
    workload, model = bert
    assert isinstance(model.bert.embeddings.word_embeddings, PackedEmbedding)
    result = export_model(model, workload, out=tmp_path / "bert.onnx")
    assert result.passed, result.report["check"]
    assert result.report["inputs"] == ["input_ids", "attention_mask"] and result.report["outputs"] == ["logits"]
    ops = _ops((tmp_path / "bert.onnx").read_bytes())
    assert ops.count("MatMulNBits") == 14 and ops.count("GatherBlockQuantized") == 3
    baseline = export_model(workload.load_baseline(), workload, out=tmp_path / "fp32.onnx")
    assert result.bytes <= 0.4 * baseline.bytes
    assert json.loads((tmp_path / "bert.onnx.json").read_text())["check"] == result.report["check"]


def test_tiny_bert_torch_export_keeps_packed_buffers(bert, tmp_path):
    workload, model = bert
    result = export_model(model, workload, out=tmp_path / "bert.pt2", format="torch-export")
    assert result.passed and result.report["check"]["max_abs_diff"] == 0.0
    program = torch.export.load(tmp_path / "bert.pt2")
    dtypes = {str(tensor.dtype) for tensor in program.state_dict.values()}
    assert "torch.uint8" in dtypes
    batch = workload.example_inputs(3)
    assert torch.equal(program.module()(**batch).logits, model(**batch).logits)


@pytest.fixture(scope="module")
def dict_checkpoint(tmp_path_factory):
    workload = dict_workload()
    model, policy = _quantized(workload, policy_doc(step("quantization", bits={"_default": 4, "extra": 8})))
    path = tmp_path_factory.mktemp("ckpt") / "dict"
    store.save(model, policy, {}, workload, str(path))
    return path


def test_the_cli_exports_a_checkpoint_refuses_an_existing_out_and_a_missing_checkpoint(
    dict_checkpoint, tmp_path, capsys
):
    out = tmp_path / "model.onnx"
    command = ["export", str(dict_checkpoint), "--format", "onnx", "--out", str(out)]
    command += ["--workload", "tests.model_workloads:dict_workload"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "MatMulNBits" in printed and ": pass" in printed and out.exists()
    report = json.loads((tmp_path / "model.onnx.json").read_text())
    assert report["inputs"] == ["image", "extra"] and report["check"]["passed"]
    assert report["source"]["checkpoint_bytes"] > 0 and report["no_low_bit_kernel"] == ["conv", "extra"]
    assert main(command) == 2
    assert capsys.readouterr().err.strip() == f"error: {out} already exists; choose a new --out (or --report) path"
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "not a checkpoint" in err


def test_the_python_api_exports_to_torch_export_and_refuses_an_unknown_format(dict_checkpoint, tmp_path):
    import orchestrator

    workload = dict_workload()
    result = orchestrator.export_checkpoint(
        dict_checkpoint, workload=workload, format="torch-export", out=tmp_path / "m.pt2"
    )
    assert result.passed and result.bytes == (tmp_path / "m.pt2").stat().st_size
    with pytest.raises(UserError, match="unknown export format 'tflite'"):
        export_checkpoint(dict_checkpoint, workload=workload, format="tflite", out=tmp_path / "m.tflite")


# --------------------------------------------------------------------------- digits checkpoints (slow)

DIGITS_POLICIES = {
    "pruned-fp32": policy_doc(step("structured_pruning", ratio={"re:conv[23]": 0.5, "fc1": 0.25})),
    "int8": policy_doc(step("quantization", bits={"_default": 8}, activation_bits=8)),
    "4-bit": policy_doc(step("quantization", bits={"_default": 4})),
    "4-bit-sparse": policy_doc(
        step("unstructured_pruning", sparsity={"_default": 0.5}), step("quantization", bits={"_default": 4})
    ),
    "lowrank": policy_doc(step("lowrank", rank={"fc1": 0.25, "conv3": 0.5})),
}


@pytest.fixture(scope="module")
def digits_checkpoints(digits, digits_baseline, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    for name, doc in DIGITS_POLICIES.items():
        applied = executor.apply(Policy.from_json(doc), digits, baseline=digits_baseline)
        store.save(applied.model, applied.policy, applied.metrics, digits, str(root / name))
    return root


@pytest.fixture(scope="module")
def fp32_onnx(digits, digits_baseline, tmp_path_factory):
    return export_model(digits_baseline, digits, out=tmp_path_factory.mktemp("fp32") / "fp32.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", DIGITS_POLICIES)
@pytest.mark.parametrize("format", ["onnx", "torch-export"])
def test_digits_checkpoints_export_and_match_pytorch(digits_checkpoints, fp32_onnx, name, format, tmp_path):
    result = export_checkpoint(digits_checkpoints / name, format=format, out=tmp_path / f"{name}.{format}")
    check = result.report["check"]
    assert result.passed and check["max_abs_diff"] <= check["tolerance"], check
    if format == "onnx":
        assert result.bytes < fp32_onnx.bytes
        assert result.report["runtime"].startswith("onnxruntime")
        assert ("activations are quantised" in check["tolerance_rule"]) == (name == "int8")


@pytest.mark.slow
def test_a_4_bit_onnx_file_is_at_most_0_35_of_the_fp32_one_and_runs_matmulnbits(
    digits_checkpoints, fp32_onnx, tmp_path
):
    result = export_checkpoint(digits_checkpoints / "4-bit", out=tmp_path / "q4.onnx")
    assert fp32_onnx.passed and result.passed
    assert result.bytes <= 0.35 * fp32_onnx.bytes, (result.bytes, fp32_onnx.bytes)
    assert _ops((tmp_path / "q4.onnx").read_bytes()).count("MatMulNBits") == 2
    assert result.report["no_low_bit_kernel"] == ["conv1", "conv2", "conv3"]
    sparse = export_checkpoint(digits_checkpoints / "4-bit-sparse", out=tmp_path / "q4s.onnx")
    assert set(sparse.report["sparse_run_dense"]) == {"conv1", "conv2", "conv3", "fc1", "fc2"}


def test_an_artifacts_flat_outputs_go_back_into_the_structure_the_model_returns():
    """ONNX Runtime returns a flat list; scoring puts it back in the model's structure (`with_tensors`), in the
    order the check compares (`output_tensors`), so a workload's `output_fn` reads it as it reads PyTorch's."""
    from collections import namedtuple

    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from orchestrator.export._check import structure_of, with_tensors
    from techniques.tools.inputs import output_tensors

    pair = namedtuple("pair", "first second")
    hidden, pooled, extra = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(5)
    outputs = {
        "model": BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled),
        "rest": (pair(extra, [extra * 2]), 7),
    }
    structure = structure_of(outputs)
    assert all(t.numel() == 0 for t in output_tensors(structure))
    flat = [t + 1 for t in output_tensors(outputs)]
    rebuilt = with_tensors(structure, iter(flat))
    assert isinstance(rebuilt["model"], BaseModelOutputWithPooling) and isinstance(rebuilt["rest"][0], pair)
    assert torch.equal(rebuilt["model"].last_hidden_state, hidden + 1) and rebuilt["model"][1] is flat[1]
    assert torch.equal(rebuilt["rest"][0].second[0], extra * 2 + 1) and rebuilt["rest"][1] == 7

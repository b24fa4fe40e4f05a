"""Quantised nn.Embedding: per-row scales, row-packed tables, lookups that decode only the rows they gather.

The finalized model's outputs are compared with the fake-quantised model's *bitwise* (torch.equal): a packed
lookup multiplies the same float32 codes by the same float32 scales as fake-quant does for those rows, so the
embedding output is the same tensor and everything downstream runs the same float32 operations on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

import techniques
import techniques.packed.embedding
from orchestrator.artifacts.store import STRUCTURE, WEIGHTS, read_artifact, write_artifact
from orchestrator.measure import measure_artifact
from orchestrator.testing import TechniqueContract
from techniques.fake_quant import ActivationFakeQuant, WeightFakeQuant
from techniques.packed.bits import packed_nbytes
from techniques.packed.embedding import GATHER_KERNEL, PackedEmbedding
from techniques.packed.finalize import finalize, kernel_report
from techniques.packed.layers import PackedLinear
from techniques.quantization import QuantizationSpec
from techniques.tools.inputs import Inputs, call_model, first_rows
from tests.tiny_models import TINY_BERT, seeded, text_data, tiny_bert

WORD = "bert.embeddings.word_embeddings"
EMBEDDINGS = (WORD, "bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings")
ROWS, DIM = TINY_BERT["vocab_size"], TINY_BERT["hidden_size"]


class EmbeddingNet(nn.Module):
    """Image inputs bucketed into 64 token ids, embedded and pooled: the technique contract's tensor inputs
    reach an embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32, padding_idx=0)
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = ((x.flatten(1).clamp(-2, 2) + 2) * 15.75).long()
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(dim=1))))


class TestEmbeddingQuantizationContract(TechniqueContract):
    model_cls = EmbeddingNet
    bad_spec_data = [{"bits": {"emb": 7}}, {"bits": 4, "group_size": 0}, {"bits": {"emb": 4.0}}]
    edge_spec_data = [
        {"bits": 2},
        {"bits": 16, "group_size": 1},
        {"bits": {"emb": 2, "_default": 16}, "activation_bits": 8},
        {"bits": {"emb": 16, "_default": 2}, "group_size": 32},
    ]

    def make_spec(self) -> techniques.TechniqueSpec:
        return QuantizationSpec(bits={"emb": 3, "fc1": 4, "_default": 8}, activation_bits=8)


def _context(seed: int = 0) -> techniques.Context:
    inputs, _ = text_data(seed=seed)
    return techniques.Context(
        example_inputs=first_rows(inputs, 4),
        calibration=lambda: [first_rows(inputs, 16), inputs],
    )


def _quantized_bert(**spec: object) -> nn.Module:
    return techniques.apply_spec(tiny_bert(), QuantizationSpec(**spec), _context())


def _logits(model: nn.Module, inputs: Inputs | None = None) -> torch.Tensor:
    with torch.no_grad():
        return call_model(model.eval(), text_data()[0] if inputs is None else inputs).logits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_word_embeddings_pack_to_bits_per_weight_and_reload_bitwise(bits: int, tmp_path: Path) -> None:
    model = _quantized_bert(bits={WORD: bits})
    fake_quant = _logits(model)
    final = finalize(model)
    assert isinstance(final.get_submodule(WORD), PackedEmbedding)
    assert torch.equal(_logits(final), fake_quant)
    size = write_artifact(final, tiny_bert(), tmp_path)
    stored = load_file(str(tmp_path / WEIGHTS))
    table = {key.removeprefix(WORD + "."): t for key, t in stored.items() if key.startswith(WORD + ".")}
    assert set(table) == {"values", "scale"}  # no float32 weight left
    assert table["values"].dtype == torch.uint8 and table["values"].shape == (ROWS, packed_nbytes(DIM, bits))
    assert table["values"].nbytes == ROWS * DIM * bits // 8  # rows of 32 codes end on a byte boundary
    assert table["scale"].dtype == torch.float32 and table["scale"].shape == (ROWS, 1)  # one scale per row
    saved = ROWS * DIM * 4 - table["values"].nbytes - table["scale"].nbytes
    assert saved - 400 <= measure_artifact(tiny_bert()) - size <= saved  # headers and the structure entry
    reloaded = read_artifact((tmp_path / STRUCTURE).read_bytes(), (tmp_path / WEIGHTS).read_bytes(), tiny_bert())
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in final.modules()]
    assert torch.equal(_logits(reloaded), fake_quant)


def test_padding_row_stays_zero_and_gets_no_gradient() -> None:
    model = _quantized_bert(bits={WORD: 3})
    layer = model.get_submodule(WORD)
    assert layer.padding_idx == 0 and (layer.weight[0] == 0).all()
    call_model(model.train(), text_data()[0]).logits.square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and (grad[0] == 0).all() and grad[1:].abs().sum() > 0
    packed = finalize(model).get_submodule(WORD)
    assert packed.padding_idx == 0
    assert (packed.dense_weight()[0] == 0).all() and (packed(torch.tensor([0, 0])) == 0).all()


@pytest.mark.parametrize("options", [{"sparse": True}, {"scale_grad_by_freq": True}, {"padding_idx": 2}])
def test_fake_quant_gradients_are_those_of_the_float_embedding(options: dict) -> None:
    torch.manual_seed(0)
    plain = nn.Embedding(10, 8, **options)
    quantized = nn.Embedding(10, 8, **options)
    quantized.load_state_dict(plain.state_dict())
    parametrize.register_parametrization(quantized, "weight", WeightFakeQuant(4))
    ids = torch.tensor([[2, 1, 1, 5], [2, 2, 9, 0]])
    for layer in (plain, quantized):
        (layer(ids) * torch.arange(8.0)).sum().backward()
    expected, got = plain.weight.grad, quantized.parametrizations.weight.original.grad
    assert expected is not None and got is not None and got.is_sparse == expected.is_sparse
    assert torch.equal(got.to_dense(), expected.to_dense())


def test_a_lookup_decodes_only_the_rows_it_gathers(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    table = nn.Embedding(1000, 24)
    parametrize.register_parametrization(table, "weight", WeightFakeQuant(5, group_size=8))
    fake_quant = table.weight.detach().clone()
    packed = finalize(nn.Sequential(table))[0]
    assert isinstance(packed, PackedEmbedding) and packed.scale.shape == (1000, 3)
    decoded: list[int] = []
    real = techniques.packed.embedding.unpack_rows
    monkeypatch.setattr(
        techniques.packed.embedding, "unpack_rows", lambda rows, *a: decoded.append(len(rows)) or real(rows, *a)
    )
    ids = torch.tensor([[7, 999, 7], [0, 500, 3]], dtype=torch.int32)
    out = packed(ids)
    assert decoded == [6] and out.shape == (2, 3, 24)
    assert torch.equal(out, fake_quant[ids.long()])


def test_whole_bert_with_activation_quantisation_skips_embeddings_and_matches_bitwise() -> None:
    model = _quantized_bert(bits=4, group_size=8, activation_bits=8)
    for name in EMBEDDINGS:
        assert not hasattr(model.get_submodule(name), "input_quant")
    observer = model.get_submodule("bert.encoder.layer.0.attention.self.query").input_quant
    assert isinstance(observer, ActivationFakeQuant) and observer.scale.item() != 1.0  # calibrated on dict batches
    fake_quant = _logits(model)
    final = finalize(model)
    assert torch.equal(_logits(final), fake_quant)
    kernels = kernel_report(final)
    assert {name: kernels[name] for name in EMBEDDINGS} == dict.fromkeys(EMBEDDINGS, GATHER_KERNEL)
    assert set(kernels.values()) == {GATHER_KERNEL, "dequantized-fp32"}
    assert isinstance(final.classifier, PackedLinear) and final.get_submodule(WORD).scale.shape == (ROWS, DIM // 8)


def test_unquantised_embeddings_stay_plain_and_report_fp32() -> None:
    final = finalize(_quantized_bert(bits={"classifier": 4}))
    assert all(type(final.get_submodule(name)) is nn.Embedding for name in EMBEDDINGS)
    assert kernel_report(final)[WORD] == "fp32"


def test_the_search_offers_bits_for_embeddings_but_not_max_norm_ones() -> None:
    technique = techniques.get("quantization")  # the search space reads layer types and eligibility from here
    assert technique.search is not None and technique.search.per_layer is not None
    per_layer = technique.search.per_layer
    bert_layers = per_layer.eligible_layers(list(techniques.layers_of(tiny_bert(), technique.layer_types)))
    assert bert_layers[:3] == list(EMBEDDINGS) and len(bert_layers) == 3 + 14  # 14 Linear layers
    model = seeded(EmbeddingNet)
    model.emb.max_norm = 1.0
    assert per_layer.eligible_layers(list(techniques.layers_of(model, technique.layer_types))) == ["fc1", "fc2"]
    with pytest.raises(techniques.SpecError, match=r"embedding 'emb' has max_norm=1\.0.*bits null"):
        techniques.apply_spec(model, QuantizationSpec(bits=4), _context())
    techniques.apply_spec(model, QuantizationSpec(bits={"emb": None, "_default": 4}), _context())


def test_group_size_must_divide_the_embedding_dim() -> None:
    with pytest.raises(
        techniques.SpecError, match=rf"group_size 5 does not divide embedding_dim {DIM} of layer '{WORD}'"
    ):
        _quantized_bert(bits={WORD: 4}, group_size=5)


def test_sixteen_bit_embeddings_are_float16_rows() -> None:
    model = _quantized_bert(bits={WORD: 16})
    fake_quant = _logits(model)
    final = finalize(model)
    packed = final.get_submodule(WORD)
    assert packed.values.dtype == torch.float16 and not hasattr(packed, "scale")
    assert torch.equal(_logits(final), fake_quant)


def test_masked_rows_stay_zero_through_quantisation() -> None:
    model = tiny_bert()
    keep = torch.ones(ROWS, DIM, dtype=torch.bool)
    keep[5:9] = False
    parametrize.register_parametrization(model.get_submodule(WORD), "weight", techniques.WeightMask(keep))
    techniques.apply_spec(model, QuantizationSpec(bits={WORD: 2}), _context())
    fake_quant = _logits(model)
    final = finalize(model)
    assert torch.equal(_logits(final), fake_quant)
    assert (final.get_submodule(WORD).dense_weight()[5:9] == 0).all()


def test_lookups_reject_bad_ids_as_nn_embedding_does() -> None:
    packed = PackedEmbedding.from_weight(torch.randn(6, 8), bits=4)
    for ids in (torch.tensor([6]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            nn.Embedding(6, 8)(ids)
        with pytest.raises(IndexError):
            packed(ids)
    with pytest.raises(TypeError, match="int32 or int64"):
        packed(torch.tensor([1.0]))


GOOD = {"num_embeddings": 6, "embedding_dim": 8, "bits": 4, "group_size": 4, "padding_idx": 0}


@pytest.mark.parametrize(
    "change",
    [
        {"num_embeddings": 0},
        {"embedding_dim": -3},
        {"embedding_dim": True},
        {"bits": 1},
        {"bits": 32},
        {"group_size": 3},
        {"padding_idx": 6},
        {"padding_idx": -1},
        {"device": "meta"},
    ],
)
def test_hand_edited_rebuild_configs_are_rejected(change: dict) -> None:
    assert PackedEmbedding.from_rebuild_config(GOOD).rebuild_config() == GOOD
    with pytest.raises((ValueError, TypeError)):
        PackedEmbedding.from_rebuild_config({**GOOD, **change})

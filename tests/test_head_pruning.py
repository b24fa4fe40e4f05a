"""Head pruning on a tiny Hugging Face BERT: whole heads go, the hidden size stays, checkpoints rebuild it; channel
pruning keeps to the feed-forward layers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertAttention, BertSelfAttention

import techniques
from orchestrator.artifacts.store import STRUCTURE, WEIGHTS, CheckpointError, read_artifact, write_artifact
from orchestrator.artifacts.structure import ATTRIBUTES_TYPE, StructureError, describe, rebuild
from orchestrator.policy import Policy, PolicyError, validate_for_model
from orchestrator.search.space import build_space
from orchestrator.testing import TechniqueContract
from techniques.channel_pruning import StructuredPruningSpec, all_but_output
from techniques.head_pruning import (
    MAX_RATIO,
    HeadPruningSpec,
    attention_modules,
    heads_of,
    heads_to_remove,
    is_attention_class,
)
from techniques.pruning import UnstructuredPruningSpec
from tests.test_policy import policy_doc, step
from tests.tiny_models import TINY_BERT, TinyCNN, seeded, text_data, tiny_bert

HIDDEN, HEADS = TINY_BERT["hidden_size"], TINY_BERT["num_attention_heads"]
HEAD_DIM = HIDDEN // HEADS
BLOCKS = [f"bert.encoder.layer.{i}" for i in range(TINY_BERT["num_hidden_layers"])]
ATTENTION = [f"{block}.attention.self" for block in BLOCKS]


def _context(n: int = 4) -> techniques.Context:
    return techniques.Context(example_inputs=text_data(n)[0])


def _heads_pruned(model: nn.Module, ctx: techniques.Context | None = None, **settings) -> nn.Module:
    return techniques.apply_spec(model, HeadPruningSpec(**settings), ctx or _context())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def _space_layers(model: nn.Module, technique: str) -> list[str]:
    """The layers a default search space offers `technique`, whatever their grouping."""
    return sorted(layer for group in build_space(model).groups[technique].values() for layer in group)


def _removed(ctx: techniques.Context) -> dict[str, list[int]]:
    return {n["layer"]: n["removed"] for n in ctx.notes if n["technique"] == "head_pruning" and "removed" in n}


# --------------------------------------------------------------------------- the shared contract


class TestHeadPruningContract(TechniqueContract):
    """The contract on the tiny BERT classifier, fed padded token ids as a dict batch."""

    bad_spec_data = [{}, {"head_ratio": 1.0}, {"head_ratio": -0.1}, {"head_ratio": True}, {"head_ratio": float("nan")}]
    bad_spec_data += [{"head_ratio": "half"}, {"head_ratio": {ATTENTION[0]: None}}, {"head_ratio": 0.5, "heads": 2}]
    bad_spec_data += [{"head_ratio": MAX_RATIO + 0.01}, {"head_ratio": float("inf")}]
    edge_spec_data = [{"head_ratio": MAX_RATIO}, {"head_ratio": 0}, {"head_ratio": {ATTENTION[1]: MAX_RATIO}}]

    def make_spec(self) -> HeadPruningSpec:
        return HeadPruningSpec(head_ratio={ATTENTION[0]: 0.25, "_default": 0.5})

    def build_model(self, seed: int = 0) -> nn.Module:
        return tiny_bert(seed)

    def build_context(self, seed: int = 0, teacher: nn.Module | None = None) -> techniques.Context:
        return techniques.Context(example_inputs=text_data(4, seed=seed)[0], seed=seed, teacher=teacher)


# --------------------------------------------------------------------------- whole heads only


def test_every_block_loses_whole_heads_and_keeps_its_hidden_size() -> None:
    base, ctx = tiny_bert(), _context()
    model = _heads_pruned(tiny_bert(), ctx, head_ratio=0.5)
    batch = text_data(5, seed=1)[0]
    assert _logits(model, batch).shape == _logits(base, batch).shape == (5, TINY_BERT["num_labels"])
    per_head = 3 * (HIDDEN * HEAD_DIM + HEAD_DIM) + HIDDEN * HEAD_DIM  # q/k/v rows and biases, output columns
    assert _params(base) - _params(model) == len(BLOCKS) * (HEADS // 2) * per_head
    for block in BLOCKS:
        attention = model.get_submodule(f"{block}.attention")
        assert (attention.self.num_attention_heads, attention.self.attention_head_size) == (HEADS // 2, HEAD_DIM)
        assert attention.self.all_head_size == HEADS // 2 * HEAD_DIM
        for layer in (attention.self.query, attention.self.key, attention.self.value):
            assert (layer.in_features, layer.out_features) == (HIDDEN, HEADS // 2 * HEAD_DIM)
        output = attention.output.dense
        assert (output.in_features, output.out_features) == (HEADS // 2 * HEAD_DIM, HIDDEN)
        assert attention.output.LayerNorm.normalized_shape == (HIDDEN,)
    assert model.bert.embeddings.word_embeddings.embedding_dim == HIDDEN
    assert set(_removed(ctx)) == set(ATTENTION) and all(len(r) == HEADS // 2 for r in _removed(ctx).values())


def test_the_pruned_model_computes_what_the_original_does_without_those_heads() -> None:
    ctx = _context()
    model = _heads_pruned(tiny_bert(), ctx, head_ratio={ATTENTION[0]: 0.25, ATTENTION[1]: 0.5})
    masked = tiny_bert()  # the original with the removed heads' values and output columns zeroed
    with torch.no_grad():
        for name, heads in _removed(ctx).items():
            attention = masked.get_submodule(name.rpartition(".")[0])
            for head in heads:
                cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                attention.self.value.weight[cols] = 0
                attention.self.value.bias[cols] = 0
                attention.output.dense.weight[:, cols] = 0
    batch = text_data(6, seed=2)[0]
    assert [len(_removed(ctx)[name]) for name in ATTENTION] == [1, 2]
    torch.testing.assert_close(_logits(model, batch), _logits(masked, batch), atol=1e-5, rtol=1e-5)


def test_the_weakest_heads_go() -> None:
    base = tiny_bert()
    attention = base.get_submodule(f"{BLOCKS[0]}.attention")
    with torch.no_grad():
        cols = slice(2 * HEAD_DIM, 3 * HEAD_DIM)
        for layer in (attention.self.query, attention.self.key, attention.self.value):
            layer.weight[cols] *= 1e-3
        attention.output.dense.weight[:, cols] *= 1e-3
    ctx = _context()
    _heads_pruned(base, ctx, head_ratio={ATTENTION[0]: 0.25})
    assert _removed(ctx) == {ATTENTION[0]: [2]}
    assert base.get_submodule(ATTENTION[1]).num_attention_heads == HEADS  # not addressed: untouched


def test_at_least_one_head_stays() -> None:
    assert [heads_to_remove(4, r) for r in (0.0, 0.2, 0.25, 0.5, 0.75, MAX_RATIO)] == [0, 0, 1, 2, 3, 3]
    assert heads_to_remove(1, MAX_RATIO) == 0 and heads_to_remove(12, 0.25) == 3 and heads_to_remove(12, 0.9) == 10
    model = _heads_pruned(tiny_bert(), head_ratio=MAX_RATIO)
    assert all(model.get_submodule(name).num_attention_heads == 1 for name in ATTENTION)
    assert _logits(model, text_data(2)[0]).shape == (2, TINY_BERT["num_labels"])


def test_deterministic_and_training_mode_restored() -> None:
    first, second = tiny_bert().train(), tiny_bert().train()
    _heads_pruned(first, head_ratio=0.5)
    _heads_pruned(second, head_ratio=0.5)
    assert first.training
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ratio_zero_and_models_without_attention_are_left_alone() -> None:
    ctx = _context()
    model = _heads_pruned(tiny_bert(), ctx, head_ratio=0.2)  # 0.2 of 4 heads is no whole head
    assert _params(model) == _params(tiny_bert()) and "nothing pruned" in ctx.notes[-1]["message"]
    cnn = techniques.apply_spec(seeded(TinyCNN), HeadPruningSpec(head_ratio=0.5), _context())
    assert _params(cnn) == _params(seeded(TinyCNN))


def test_low_rank_factored_projections_lose_whole_heads_too() -> None:
    from techniques.lowrank import LowRankSpec

    ctx = _context()
    model = techniques.apply_spec(tiny_bert(), LowRankSpec(rank={"re:.*attention.*": 0.5}), ctx)
    before = _logits(model, text_data(3)[0])
    _heads_pruned(model, ctx, head_ratio=0.5)
    attention = model.get_submodule(f"{BLOCKS[0]}.attention")
    assert [attention.self.query[1].out_features, attention.output.dense[0].in_features] == [HEADS // 2 * HEAD_DIM] * 2
    assert attention.self.num_attention_heads == HEADS // 2
    assert _logits(model, text_data(3)[0]).shape == before.shape


def test_an_attention_the_inputs_never_reach_keeps_its_heads() -> None:
    model, ctx = tiny_bert(), _context()
    model.spare = BertSelfAttention(model.config)
    _heads_pruned(model, ctx, head_ratio=0.5)
    assert model.spare.num_attention_heads == HEADS and model.spare.query.out_features == HIDDEN
    assert any(n["layer"] == "spare" and "never reach" in n["message"] for n in ctx.notes)
    assert set(_removed(ctx)) == set(ATTENTION)


def test_runs_before_masks_only() -> None:
    model = techniques.apply_spec(tiny_bert(), UnstructuredPruningSpec(sparsity=0.5), _context())
    with pytest.raises(techniques.SpecError, match="before"):
        _heads_pruned(model, head_ratio=0.5)


# --------------------------------------------------------------------------- which modules are attention


class _GroupedQuery(nn.Module):
    """Fewer key/value heads than query heads: not a layout head pruning handles."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 4, 8
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)


def test_attention_is_recognised_by_its_layout() -> None:
    assert is_attention_class(BertSelfAttention) and not is_attention_class(BertAttention)
    assert not is_attention_class(nn.Linear) and not is_attention_class(nn.MultiheadAttention)
    assert [name for name, _, _ in attention_modules(tiny_bert())] == ATTENTION
    assert is_attention_class(_GroupedQuery) and heads_of(_GroupedQuery()) is None
    model = nn.Sequential(_GroupedQuery())
    ctx = techniques.Context(example_inputs=torch.zeros(1, 32))
    techniques.apply_spec(model, HeadPruningSpec(head_ratio=0.5), ctx)
    assert any("kept all heads" in n["message"] for n in ctx.notes) and model[0].q_proj.out_features == 32


def test_registered_between_low_rank_and_channel_pruning_with_attention_search() -> None:
    technique = techniques.get("head_pruning")
    order = list(techniques.registry())
    assert order.index("lowrank") < order.index("head_pruning") < order.index("structured_pruning")
    assert technique.structural and technique.search is not None and technique.search.per_layer is not None
    per_layer = technique.search.per_layer
    assert (per_layer.setting, per_layer.off, per_layer.choices) == ("head_ratio", 0.0, (0.0, 0.25, 0.5))
    layers = list(techniques.layers_of(tiny_bert(), technique.layer_types))
    assert per_layer.eligible_layers(layers) == ATTENTION
    assert list(techniques.layers_of(seeded(TinyCNN), technique.layer_types)) == []
    assert _space_layers(tiny_bert(), "head_pruning") == ATTENTION


def test_keys_must_address_attention_modules() -> None:
    for key in ("no_such_layer", f"{ATTENTION[0]}.query"):
        with pytest.raises(techniques.SpecError, match="match no MultiHeadAttention"):
            _heads_pruned(tiny_bert(), head_ratio={key: 0.5})
    policy = Policy.from_json(policy_doc(step("head_pruning", head_ratio={f"{ATTENTION[0]}.query": 0.5})))
    with pytest.raises(PolicyError, match="head_pruning handles MultiHeadAttention"):
        validate_for_model(policy, tiny_bert())
    validate_for_model(Policy.from_json(policy_doc(step("head_pruning", head_ratio={ATTENTION[0]: 0.5}))), tiny_bert())


# --------------------------------------------------------------------------- feed-forward channels


def test_channel_pruning_cuts_the_feed_forward_width_only() -> None:
    base, ctx = tiny_bert(), _context()
    model = techniques.apply_spec(tiny_bert(), StructuredPruningSpec(ratio=0.5), ctx)
    half = TINY_BERT["intermediate_size"] // 2
    for block in BLOCKS:
        layer = model.get_submodule(block)
        assert (layer.intermediate.dense.out_features, layer.output.dense.in_features) == (half, half)
        assert layer.output.dense.out_features == HIDDEN and layer.attention.output.dense.out_features == HIDDEN
        assert all(getattr(layer.attention.self, p).out_features == HIDDEN for p in ("query", "key", "value"))
        assert layer.attention.self.num_attention_heads == HEADS
    assert model.bert.embeddings.word_embeddings.embedding_dim == HIDDEN
    notes = [(n["layer"], n["message"]) for n in ctx.notes]
    assert any(layer == f"{ATTENTION[0]}.query" and "head_pruning removes whole heads" in m for layer, m in notes)
    assert any(layer == f"{BLOCKS[0]}.output.dense" and "hidden size" in m for layer, m in notes)
    batch = text_data(3, seed=4)[0]
    assert _logits(model, batch).shape == _logits(base, batch).shape


def test_query_key_value_are_not_offered_to_channel_pruning() -> None:
    model = tiny_bert()
    technique = techniques.get("structured_pruning")
    layers = list(techniques.layers_of(model, technique.layer_types))
    assert all_but_output(layers) == [f"{block}.intermediate.dense" for block in BLOCKS]
    assert _space_layers(model, "structured_pruning") == [f"{block}.intermediate.dense" for block in BLOCKS]


def test_an_explicit_query_key_is_skipped_with_a_note() -> None:
    ctx = _context()
    key = f"{ATTENTION[0]}.query"
    model = techniques.apply_spec(tiny_bert(), StructuredPruningSpec(ratio={key: 0.5}), ctx)
    assert model.get_submodule(key).out_features == HIDDEN
    assert any(n["layer"] == key and "head_pruning" in n["message"] for n in ctx.notes)


# --------------------------------------------------------------------------- checkpoints


def _pruned_both(ctx: techniques.Context | None = None) -> nn.Module:
    ctx = ctx or _context()
    model = _heads_pruned(tiny_bert(), ctx, head_ratio={ATTENTION[0]: 0.25, "_default": 0.5})
    return techniques.apply_spec(model, StructuredPruningSpec(ratio={"re:.*intermediate.dense": 0.5}), ctx)


def test_structure_record_rebuilds_the_pruned_architecture_bitwise(tmp_path) -> None:
    model = _pruned_both().eval()
    record = describe(model, tiny_bert(seed=1))
    attributes = {e["name"]: e["config"] for e in record if e["type"] == ATTRIBUTES_TYPE}
    assert attributes == {
        ATTENTION[0]: {"num_attention_heads": 3, "all_head_size": 3 * HEAD_DIM},
        ATTENTION[1]: {"num_attention_heads": 2, "all_head_size": 2 * HEAD_DIM},
    }
    rebuilt = rebuild(tiny_bert(seed=1), json.loads(json.dumps(record)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    write_artifact(model, tiny_bert(seed=1), tmp_path)
    reloaded = read_artifact((tmp_path / STRUCTURE).read_bytes(), (tmp_path / WEIGHTS).read_bytes(), tiny_bert(seed=2))
    batch = text_data(7, seed=3)[0]
    for other in (rebuilt, reloaded):
        assert torch.equal(_logits(other, batch), _logits(model, batch))
        assert [other.get_submodule(n).num_attention_heads for n in ATTENTION] == [3, 2]
    assert describe(tiny_bert(), tiny_bert(seed=1)) == []  # weights differ, the architecture does not


def _record_with(config: dict, name: str = ATTENTION[0]) -> list[dict]:
    return [{"name": name, "type": ATTRIBUTES_TYPE, "config": config}]


HOSTILE_ATTRIBUTES = {
    "unknown-attribute": ({"forward": 3}, ATTENTION[0], "not one a structure record may set"),
    "dunder": ({"__class__": 3}, ATTENTION[0], "not one a structure record may set"),
    "string": ({"num_attention_heads": "2"}, ATTENTION[0], "positive integer"),
    "float": ({"num_attention_heads": 2.0}, ATTENTION[0], "positive integer"),
    "bool": ({"num_attention_heads": True}, ATTENTION[0], "positive integer"),
    "negative": ({"all_head_size": -16}, ATTENTION[0], "positive integer"),
    "zero": ({"num_attention_heads": 0}, ATTENTION[0], "positive integer"),
    "list": ({"num_attention_heads": [2]}, ATTENTION[0], "positive integer"),
    "module-lacks-it": ({"num_attention_heads": 2}, f"{BLOCKS[0]}.attention.output", "has no integer attribute"),
    "linear-lacks-it": ({"head_dim": 2}, f"{ATTENTION[0]}.query", "has no integer attribute"),
    "no-such-module": ({"num_attention_heads": 2}, "bert.nowhere", "which the model does not have"),
    "root": ({"num_attention_heads": 2}, "", "which the model does not have"),
    "empty": ({}, ATTENTION[0], "non-empty object"),
    "not-an-object": ([["num_attention_heads", 2]], ATTENTION[0], "non-empty object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ATTRIBUTES))
def test_hostile_attribute_records_are_refused(case: str) -> None:
    config, name, words = HOSTILE_ATTRIBUTES[case]
    model = tiny_bert()
    before = copy.deepcopy(vars(model.get_submodule(ATTENTION[0])))
    with pytest.raises(StructureError, match=words):
        rebuild(model, _record_with(config, name))
    after = vars(model.get_submodule(ATTENTION[0]))
    assert {k: after[k] for k in ("num_attention_heads", "all_head_size")} == {
        k: before[k] for k in ("num_attention_heads", "all_head_size")
    }


def test_a_hostile_attribute_in_a_checkpoint_is_one_checkpoint_error(tmp_path) -> None:
    model = _pruned_both().eval()
    write_artifact(model, tiny_bert(), tmp_path)
    doc = json.loads((tmp_path / STRUCTURE).read_text())
    entry = next(e for e in doc["modules"] if e["type"] == ATTRIBUTES_TYPE)
    entry["config"] = {"num_attention_heads": -1}
    with pytest.raises(CheckpointError, match="checkpoint does not rebuild: bad structure entry"):
        read_artifact(json.dumps(doc).encode(), (tmp_path / WEIGHTS).read_bytes(), tiny_bert())

"""Unstructured magnitude pruning: exact sparsities, global ranking, masks that survive fine-tuning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import techniques
from orchestrator.testing import TechniqueContract, make_context
from techniques.pruning import MAX_SPARSITY, UnstructuredPruningSpec, apply, existing_mask
from tests.tiny_models import TinyCNN, TinyResNet, seeded, tiny_data

LAYERS = ("conv1", "conv2", "fc1", "fc2")


def _sparsity(module: nn.Module) -> float:
    weight = module.weight.detach()
    return float((weight == 0).sum()) / weight.numel()


def _pruned(
    spec: UnstructuredPruningSpec, model_cls: type[nn.Module] = TinyCNN, ctx: techniques.Context | None = None
) -> nn.Module:
    return apply(seeded(model_cls), spec, ctx or make_context())


class TestUnstructuredContract(TechniqueContract):
    bad_spec_data = [
        {"sparsity": -0.1},
        {"sparsity": 1.0},
        {"sparsity": "half"},
        {"sparsity": True},
        {"sparsity": {"fc1": 0.5, "conv1": 2}},
        {"sparsity": 1},
        {"sparsity": MAX_SPARSITY + 0.001},
        {"sparsity": float("nan")},
        {"sparsity": float("inf")},
        {"sparsity": {"fc1": float("-inf")}},
        {"sparsity": None},
        {"sparsity": 0.5, "criterion": "largest"},
        {"sparsity": 0.5, "scope": "model"},
        {"sparsity": 0.5, "bogus": 1},
        {},
    ]

    edge_spec_data = [
        {"sparsity": MAX_SPARSITY},
        {"sparsity": MAX_SPARSITY, "scope": "global"},
        {"sparsity": MAX_SPARSITY, "criterion": "random"},
        {"sparsity": {"conv1": 0, "conv2": MAX_SPARSITY, "_default": 0.0}},
    ]

    def make_spec(self) -> UnstructuredPruningSpec:
        return UnstructuredPruningSpec(sparsity={"fc1": 0.8, "re:conv.*": 0.3, "_default": 0.5})


def test_spec_errors_name_the_problem() -> None:
    with pytest.raises(techniques.SpecError, match=r"sparsity for layer 'fc1'.*\[0.0, 0.99\]"):
        UnstructuredPruningSpec(sparsity={"fc1": 1.5})
    with pytest.raises(techniques.SpecError, match="scope must be one of layer, global"):
        UnstructuredPruningSpec(sparsity=0.5, scope="model")


def test_each_layer_reaches_its_requested_sparsity() -> None:
    requested = {"conv1": 0.25, "conv2": 0.5, "fc1": 0.9, "fc2": 0.0}
    model = _pruned(UnstructuredPruningSpec(sparsity=requested))
    for name, value in requested.items():
        layer = model.get_submodule(name)
        assert abs(_sparsity(layer) - value) <= 0.5 / layer.weight.numel(), name
    assert not parametrize.is_parametrized(model.fc2), "sparsity 0 leaves the layer alone"
    kept = model.conv2.weight.detach().abs()
    assert kept[kept > 0].min() >= model.conv2.parametrizations.weight.original.detach().abs()[kept == 0].max()


@settings(max_examples=30, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), rows=st.integers(1, 12), cols=st.integers(1, 12))
def test_achieved_count_is_the_rounded_request(sparsity: float, rows: int, cols: int) -> None:
    torch.manual_seed(rows * 100 + cols)
    model = nn.Sequential(nn.Linear(cols, rows))
    apply(model, UnstructuredPruningSpec(sparsity=sparsity), make_context())
    zeros = int((model[0].weight == 0).sum())
    assert abs(zeros - sparsity * rows * cols) <= 0.5


def test_global_scope_prunes_the_smallest_weights_across_layers() -> None:
    base, ctx = seeded(TinyCNN), make_context()
    model = _pruned(UnstructuredPruningSpec(sparsity=0.6, scope="global"), ctx=ctx)
    pruned, kept = [], []
    for name in LAYERS:
        original = base.get_submodule(name).weight.detach().abs().flatten()
        mask = existing_mask(model.get_submodule(name)).mask.flatten()
        pruned.append(original[~mask])
        kept.append(original[mask])
    pruned, kept = torch.cat(pruned), torch.cat(kept)
    assert pruned.max() <= kept.min()
    assert abs(len(pruned) / (len(pruned) + len(kept)) - 0.6) < 1e-3
    per_layer = [_sparsity(model.get_submodule(name)) for name in LAYERS]
    assert max(per_layer) - min(per_layer) > 0.1, "a global threshold gives layers different sparsities"
    assert any(note["layer"] is None and abs(note["sparsity"] - 0.6) < 1e-3 for note in ctx.notes)
    assert [note["sparsity"] for note in ctx.notes if note["layer"]] == pytest.approx(per_layer)


def test_masks_survive_optimizer_steps() -> None:
    model = _pruned(UnstructuredPruningSpec(sparsity=0.7)).train()
    masks = {name: model.get_submodule(name).weight.detach() != 0 for name in LAYERS}
    before = model.fc1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = tiny_data(32)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.all(weight[~mask] == 0), name
        assert abs(_sparsity(model.get_submodule(name)) - 0.7) < 0.01, name
    assert not torch.equal(model.fc1.weight.detach()[masks["fc1"]], before[masks["fc1"]]), "training happened"


def test_pruning_again_merges_into_the_existing_mask() -> None:
    model = _pruned(UnstructuredPruningSpec(sparsity=0.5))
    first = existing_mask(model.fc1).mask.clone()
    assert dict(techniques.layers_of(model, (nn.Linear,))).keys() == {"fc1", "fc2"}
    apply(model, UnstructuredPruningSpec(sparsity={"fc1": 0.8}), make_context())
    assert len(model.fc1.parametrizations.weight) == 1
    assert abs(_sparsity(model.fc1) - 0.8) < 1e-3
    assert not torch.any(existing_mask(model.fc1).mask & ~first), "earlier pruned weights stay pruned"


def test_ties_break_by_position() -> None:
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    apply(model, UnstructuredPruningSpec(sparsity=0.5), make_context())
    assert model[0].weight.detach().flatten().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_factored_layers_inherit_the_setting_of_the_layer_they_came_from() -> None:
    model = seeded(TinyResNet)
    model.conv_a = nn.Sequential(nn.Conv2d(8, 3, (3, 1), padding=(1, 0)), nn.Conv2d(3, 8, (1, 3), padding=(0, 1)))
    ctx = make_context()
    apply(model, UnstructuredPruningSpec(sparsity={"conv_a": 0.5}), ctx)
    assert [note["layer"] for note in ctx.notes] == ["conv_a.0", "conv_a.1"]
    assert all(abs(_sparsity(layer) - 0.5) < 0.02 for layer in model.conv_a)
    assert not parametrize.is_parametrized(model.stem)
    with torch.no_grad():
        assert model(tiny_data(8)[0]).shape == (8, 10)


def test_random_criterion_prunes_a_seeded_random_subset() -> None:
    with pytest.raises(techniques.SpecError, match="criterion must be one of magnitude, random"):
        UnstructuredPruningSpec(sparsity=0.3, criterion="l1")
    spec = UnstructuredPruningSpec(sparsity=0.3, criterion="random")
    assert techniques.spec_from_json(spec.to_json()) == spec

    def masks(seed: int) -> list[torch.Tensor]:
        model = _pruned(spec, ctx=make_context(seed))
        return [existing_mask(model.get_submodule(name)).mask for name in LAYERS]

    first = masks(0)
    assert all(torch.equal(a, b) for a, b in zip(first, masks(0), strict=True)), "same seed, same mask"
    assert not all(torch.equal(a, b) for a, b in zip(first, masks(1), strict=True)), "another seed, another mask"
    for mask in first:
        assert abs(float((~mask).sum()) - 0.3 * mask.numel()) <= 0.5
    magnitude = _pruned(UnstructuredPruningSpec(sparsity=0.3))
    assert not torch.equal(first[2], existing_mask(magnitude.fc1).mask), "not the magnitude mask"

"""Structured channel pruning: the model really shrinks, coupled layers stay consistent, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import techniques
from orchestrator.measure import count_flops, count_weights, measure_artifact
from orchestrator.testing import TechniqueContract, make_context
from techniques.channel_pruning import MAX_RATIO, MAX_ROUND_TO, StructuredPruningSpec, apply, kept_channels
from techniques.pruning import UnstructuredPruningSpec
from techniques.pruning import apply as apply_unstructured
from tests.tiny_models import DictInputNet, TinyCNN, TinyResNet, dict_data, seeded, tiny_data

PLAIN_TYPES = {nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.MaxPool2d, nn.Sequential}


def _pruned(model: nn.Module, ctx: techniques.Context | None = None, **settings) -> nn.Module:
    return apply(model, StructuredPruningSpec(**settings), ctx or make_context())


def _factored_cnn() -> nn.Module:
    """TinyCNN with conv2 factored the way low-rank leaves it: a Sequential of two thinner convolutions."""
    model = seeded(TinyCNN)
    model.conv2 = nn.Sequential(
        nn.Conv2d(8, 4, (3, 1), padding=(1, 0), bias=False),
        nn.Conv2d(4, 16, (1, 3), padding=(0, 1), bias=False),
    )
    return model


class TestStructuredContract(TechniqueContract):
    bad_spec_data = [
        {"ratio": -0.1},
        {"ratio": 0.95},
        {"ratio": "half"},
        {"ratio": {"conv1": None}},
        {"ratio": 0.5, "importance": "l3"},
        {"ratio": 0.5, "round_to": 0},
        {"ratio": 0.5, "round_to": 2.5},
        {"ratio": 0.5, "round_to": True},
        {"ratio": 0.5, "round_to": 8.0},  # an integral float is not an int
        {"ratio": 0.5, "round_to": MAX_ROUND_TO + 1},  # bounded
        {"ratio": 0.5, "round_to": 10**30},
        {"ratio": 0.5, "round_to": -8},
        {"ratio": float("nan")},
        {"ratio": float("inf")},
        {"ratio": {"fc1": float("-inf")}},
        {"ratio": False},
        {"ratio": 1},
        {"ratio": 0.5, "bogus": 1},
        {},
    ]

    edge_spec_data = [
        {"ratio": MAX_RATIO},
        {"ratio": MAX_RATIO, "round_to": 1},
        {"ratio": MAX_RATIO, "round_to": MAX_ROUND_TO},
        {"ratio": {"conv1": 0, "conv2": MAX_RATIO, "fc1": 0.5}, "round_to": 3},
    ]

    def make_spec(self) -> StructuredPruningSpec:
        return StructuredPruningSpec(ratio={"fc1": 0.25, "_default": 0.5}, importance="l1")


def test_half_the_channels_shrinks_params_bytes_and_flops() -> None:
    base, model = seeded(TinyCNN), _pruned(seeded(TinyCNN), ratio=0.5)
    x = tiny_data(1)[0]
    assert count_weights(model)[0] <= 0.6 * count_weights(base)[0]
    assert measure_artifact(model) <= 0.6 * measure_artifact(base)
    assert count_flops(model, x) < 0.5 * count_flops(base, x)
    assert (model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features) == (4, 8, 16)
    assert (model.bn1.num_features, model.bn2.num_features, model.fc1.in_features) == (4, 8, 8 * 16)


def test_output_layer_keeps_its_features() -> None:
    ctx = make_context()
    model = _pruned(seeded(TinyCNN), ctx, ratio=0.75)
    assert model.fc2.out_features == 10 and model.fc2.in_features == 8
    assert any(n["layer"] == "fc2" and "model's output" in n["message"] for n in ctx.notes)
    with torch.no_grad():
        assert model(tiny_data(5)[0]).shape == (5, 10)


def test_conv_output_layer_is_protected() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(2))
    apply(model, StructuredPruningSpec(ratio=0.5), make_context())
    assert (model[0].out_channels, model[2].in_channels, model[2].out_channels) == (4, 4, 4)


def test_residual_block_stays_consistent() -> None:
    ctx = make_context()
    model = _pruned(seeded(TinyResNet), ctx, ratio={"stem": 0.5, "conv_b": 0.25, "conv_a": 0.5})
    # stem and conv_b feed one residual add: the group takes the smaller ratio (25% of 8 channels).
    assert model.stem.out_channels == model.conv_b.out_channels == model.bn0.num_features == 6
    assert model.conv_a.in_channels == model.fc.in_features == 6
    assert model.conv_a.out_channels == model.bn_a.num_features == model.conv_b.in_channels == 4
    assert any(n["layer"] == "stem" and n.get("ratio") == 0.25 for n in ctx.notes)
    with torch.no_grad():
        assert model(tiny_data(3)[0]).shape == (3, 10)


def test_unaddressed_coupled_layer_keeps_the_group_whole() -> None:
    model = _pruned(seeded(TinyResNet), ratio={"stem": 0.5})
    assert model.stem.out_channels == model.conv_b.out_channels == 8


def test_prunes_the_weakest_channels() -> None:
    base = seeded(TinyCNN)
    with torch.no_grad():
        base.conv1.weight[[1, 6]] *= 1e-3
    model = _pruned(base, ratio={"conv1": 0.25}, importance="l1")
    reference = seeded(TinyCNN).conv1.weight
    kept = [i for i in range(8) if i not in (1, 6)]
    assert torch.equal(model.conv1.weight, reference[kept])


def test_deterministic_and_rebuildable_as_plain_layers() -> None:
    first, second = _pruned(seeded(TinyCNN), ratio=0.5), _pruned(seeded(TinyCNN), ratio=0.5)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    for name, module in first.named_modules():
        assert type(module) in PLAIN_TYPES | {TinyCNN}, name
        rebuilt = _rebuild(module)
        if rebuilt is not None:
            rebuilt.load_state_dict(module.state_dict(), strict=True)


def _rebuild(module: nn.Module) -> nn.Module | None:
    """A fresh layer built only from the recorded shapes, as a checkpoint loader would build it."""
    if type(module) is nn.Conv2d:
        return nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            bias=module.bias is not None,
        )  # fmt: skip
    if type(module) is nn.Linear:
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    if type(module) is nn.BatchNorm2d:
        return nn.BatchNorm2d(module.num_features)
    return None


def test_factored_conv_sequence_is_pruned_consistently() -> None:
    base, ctx = _factored_cnn(), make_context()
    model = _pruned(_factored_cnn(), ctx, ratio={"conv2": 0.5})
    assert (model.conv2[0].out_channels, model.conv2[1].in_channels) == (2, 2)
    assert (model.conv2[1].out_channels, model.bn2.num_features, model.fc1.in_features) == (8, 8, 8 * 16)
    assert model.conv1.out_channels == 8
    assert {n["layer"] for n in ctx.notes} == {"conv2.0", "conv2.1", "bn2", "fc1"}
    x = tiny_data(4)[0]
    with torch.no_grad():
        assert model(x).shape == base(x).shape
    assert count_flops(model, x) < count_flops(base, x)


def test_round_to_rounds_kept_channels_up() -> None:
    assert kept_channels(16, 0.5, None) == 8
    assert kept_channels(16, 0.6, 4) == 8  # 16 - 9 = 7 kept, rounded up to 8
    assert kept_channels(10, 0.9, None) == 1
    assert kept_channels(3, 0.9, 8) == 3
    model = _pruned(seeded(TinyCNN), ratio=0.6, round_to=4)
    assert (model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features) == (4, 8, 16)


def test_training_mode_is_restored_and_ratio_zero_is_a_no_op() -> None:
    model = seeded(TinyCNN).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _pruned(model, ratio=0.0)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rejects_models_already_carrying_masks() -> None:
    model = apply_unstructured(seeded(TinyCNN), UnstructuredPruningSpec(sparsity=0.5), make_context())
    with pytest.raises(techniques.SpecError, match="before"):
        _pruned(model, ratio=0.5)


class _TwoHeads(nn.Module):
    """Returns its features as well as its logits, so the feature conv is an output although it feeds on."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 8, 3)
        self.hidden = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.features(x))
        return self.head(self.hidden(features).mean(dim=(2, 3))), features


def test_a_layer_whose_output_is_also_returned_keeps_its_channels() -> None:
    model = apply(_TwoHeads(), StructuredPruningSpec(ratio=0.5), make_context())
    assert (model.features.out_channels, model.hidden.out_channels, model.head.out_features) == (8, 4, 10)


def test_round_to_bound_and_non_string_importance_are_spec_errors() -> None:
    StructuredPruningSpec(ratio=0.5, round_to=MAX_ROUND_TO)  # the bound itself is valid
    with pytest.raises(techniques.SpecError, match=rf"round_to must be an integer in \[1, {MAX_ROUND_TO}\]"):
        StructuredPruningSpec(ratio=0.5, round_to=MAX_ROUND_TO + 1)
    with pytest.raises(techniques.SpecError, match="importance"):  # unhashable: a TypeError before
        StructuredPruningSpec(ratio=0.5, importance=["l1"])


class _TwoInputs(nn.Module):
    """Two named inputs summed after their own layers; returns a dict with `logits`."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(6, 16), nn.Linear(4, 16)
        self.fc, self.head = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.left(left) + self.right(right))
        return {"logits": self.head(torch.relu(self.fc(hidden)))}


@pytest.mark.parametrize("structure", ["dict", "tuple"])
def test_traces_models_that_take_a_dict_or_a_tuple(structure: str) -> None:
    gen = torch.Generator().manual_seed(0)
    batch = {"left": torch.randn(4, 6, generator=gen), "right": torch.randn(4, 4, generator=gen)}
    inputs = batch if structure == "dict" else (batch["left"], batch["right"])
    torch.manual_seed(0)
    model = apply(_TwoInputs().eval(), StructuredPruningSpec(ratio=0.5), techniques.Context(example_inputs=inputs))
    assert (model.left.out_features, model.right.out_features, model.fc.in_features) == (8, 8, 8)
    assert (model.fc.out_features, model.head.in_features, model.head.out_features) == (4, 4, 3)
    with torch.no_grad():
        assert model(**batch)["logits"].shape == (4, 3)


def test_channels_the_graph_maps_past_a_layer_are_kept_with_a_note() -> None:
    # Torch-Pruning 1.6.1 maps the channels of a concatenation of flattened conv features and a Linear's
    # features past the Linear's width; pruning them would raise an IndexError.
    inputs = dict_data(4)[0]
    torch.manual_seed(0)
    ctx = techniques.Context(example_inputs=inputs)
    model = apply(DictInputNet().eval(), StructuredPruningSpec(ratio=0.5), ctx)
    assert (model.conv.out_channels, model.extra.out_features) == (8, 8)
    assert any(n["layer"] == "extra" and "past a layer's width" in n["message"] for n in ctx.notes)
    with torch.no_grad():
        assert model(**inputs)["logits"].shape == (4, 10)


def test_a_decoder_is_left_to_the_decoder_techniques() -> None:
    """Llama's gated feed-forward is ffn_pruning's: never offered here, and a decoder is refused in one line
    (Torch-Pruning's grouping of a decoder's residual stream ran for over ten minutes on a two-layer model)."""
    from orchestrator.search.space import build_space
    from tests.lm_workloads import llama_model

    model = llama_model()
    layers = list(techniques.layers_of(model, techniques.get("structured_pruning").layer_types))
    eligible = techniques.get("structured_pruning").search.per_layer.eligible_layers(layers)
    assert not [name for name in eligible if name.rpartition(".")[2] in ("gate_proj", "up_proj", "down_proj")]
    assert "structured_pruning" not in build_space(model).groups
    with pytest.raises(techniques.SpecError, match="ffn_pruning"):
        _pruned(model, ratio=0.5)

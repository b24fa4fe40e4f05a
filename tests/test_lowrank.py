"""Low-rank factorisation: the technique contract, parameter savings, reconstruction and rank rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import techniques
from orchestrator.testing import TechniqueContract, make_context
from techniques._base import WeightMask
from techniques.lowrank import (
    MAX_RANK,
    LowRankSpec,
    energy_rank,
    factor_conv_cp,
    factor_conv_tucker,
    factor_linear,
)
from tests.tiny_models import TinyCNN, seeded

# the ends of each kind of rank: an int, a fraction of the parameters kept, an energy kept; one layer each
EDGE_RANKS = [1, MAX_RANK, 1e-9, 0.999, "energy:1", "energy:1e-9", {"conv2": 1, "fc1": "energy:0.5", "_default": None}]


class TestLowRankContract(TechniqueContract):
    bad_spec_data = [
        {"rank": 0},
        {"rank": -3},
        {"rank": 1.0},
        {"rank": 1.5},
        {"rank": 0.0},
        {"rank": True},
        {"rank": "energy:1.5"},
        {"rank": "energy:abc"},
        {"rank": "half"},
        {"rank": {"fc1": 0}},
        {"rank": MAX_RANK + 1},  # explicit ranks are bounded
        {"rank": {"fc1": 10**30}},
        {"rank": 4.0},  # an integral float is not an int rank
        {"rank": {"conv2": 2.0}},
        {"rank": float("nan")},
        {"rank": float("inf")},
        {"rank": -0.5},
        {"rank": "energy:nan"},
        {"rank": "energy:inf"},
        {"rank": "energy:0"},
        {"rank": "energy:"},
        {"rank": 0.5, "conv_method": "svd"},
        {"rank": 0.5, "conv_method": ["tucker"]},
        {"rank": 0.5, "colour": "red"},
    ]

    edge_spec_data = [{"rank": rank, "conv_method": "tucker"} for rank in EDGE_RANKS]

    def make_spec(self) -> LowRankSpec:
        return LowRankSpec(rank={"conv2": 0.5, "fc1": 0.5, "_default": None})


class TestLowRankCP(TestLowRankContract):
    edge_spec_data = [{"rank": rank, "conv_method": "cp"} for rank in EDGE_RANKS]

    def make_spec(self) -> LowRankSpec:
        return LowRankSpec(rank=0.5, conv_method="cp")


def _apply(spec: LowRankSpec, width: int = 16) -> tuple[nn.Module, nn.Module, techniques.Context]:
    base = seeded(TinyCNN, width=width)
    ctx = make_context()
    model = techniques.apply_spec(seeded(TinyCNN, width=width), spec, ctx)
    return base, model, ctx


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _factored(ctx: techniques.Context) -> dict[str, dict]:
    return {n["layer"]: n for n in ctx.notes if n["message"].startswith("factored")}


def _skipped(ctx: techniques.Context) -> dict[str, dict]:
    return {n["layer"]: n for n in ctx.notes if n["message"].startswith("skipped")}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_error_message_names_layer_and_value() -> None:
    with pytest.raises(techniques.SpecError, match=r"'fc1'.*-2"):
        LowRankSpec(rank={"fc1": -2})
    with pytest.raises(techniques.SpecError, match="conv_method.*'svd'"):
        LowRankSpec(rank=0.5, conv_method="svd")


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_half_fraction_halves_factored_layers(method: str) -> None:
    base, model, ctx = _apply(LowRankSpec(rank={"conv2": 0.5, "fc1": 0.5}, conv_method=method))
    for name in ("conv2", "fc1"):
        before = _params(base.get_submodule(name))
        after = _params(model.get_submodule(name))
        assert isinstance(model.get_submodule(name), nn.Sequential)
        assert after <= 0.5 * before and after >= 0.4 * before, (name, before, after)
        assert _factored(ctx)[name]["params_after"] == after
    assert _params(model) <= _params(base) - 0.45 * (_params(base.conv2) + _params(base.fc1))
    assert type(model.conv1) is nn.Conv2d and type(model.fc2) is nn.Linear  # not addressed
    expected = 4 if method == "cp" else 3
    assert len(model.conv2) == expected
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in [*model.conv2, *model.fc1])


def test_full_rank_reconstructs_layers_exactly() -> None:
    torch.manual_seed(0)
    linear, conv = nn.Linear(24, 12), nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x, img = torch.randn(5, 24), torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        assert _relative_error(factor_linear(linear, 12)(x), linear(x)) < 1e-5
        assert _relative_error(factor_conv_tucker(conv, (6, 10))(img), conv(img)) < 1e-5
        # Near-full rank loses only the smallest singular direction.
        assert _relative_error(factor_linear(linear, 11)(x), linear(x)) < 0.3


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"), [(1, 1, 1), (2, 1, 1), ((2, 1), (1, 2), (1, 2)), (1, "same", 1)]
)
def test_exactly_low_rank_conv_is_recovered(stride, padding, dilation) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, dilation=dilation)
    a, b, c, d = torch.randn(12, 3), torch.randn(8, 3), torch.randn(3, 3), torch.randn(3, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", a, b, c, d))  # CP rank 3, Tucker ranks (3, 3)
    img = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        want = conv(img)
        tucker, cp = factor_conv_tucker(conv, (3, 3)), factor_conv_cp(conv, 3)
        assert tucker(img).shape == cp(img).shape == want.shape
        assert _relative_error(tucker(img), want) < 1e-4
        assert _relative_error(cp(img), want) < 1e-2
    assert _params(tucker) < _params(conv) and _params(cp) < _params(conv)


def test_low_rank_linear_through_apply_is_exact_and_smaller() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 6) @ torch.randn(6, 64))
    x = torch.randn(8, 64)
    want = model(x).detach()
    ctx = techniques.Context(example_inputs=x)
    model = techniques.apply_spec(model, LowRankSpec(rank={"0": "energy:0.999999"}), ctx)
    assert _factored(ctx)["0"]["ranks"] == 6
    assert _relative_error(model(x).detach(), want) < 1e-5
    assert _params(model[0]) == 6 * 128 + 64


def test_energy_rank_grows_with_energy() -> None:
    ranks = {}
    for energy in (0.5, 0.9, 0.99):
        _, _, ctx = _apply(LowRankSpec(rank={"fc1": f"energy:{energy}", "conv2": f"energy:{energy}"}))
        notes = {n["layer"]: n.get("ranks") for n in ctx.notes}
        ranks[energy] = (notes["fc1"], notes["conv2"])
    assert ranks[0.5][0] < ranks[0.9][0] < ranks[0.99][0]
    assert all(lo <= hi for lo, hi in zip(ranks[0.5][1], ranks[0.99][1], strict=True))
    assert sum(ranks[0.5][1]) < sum(ranks[0.99][1])
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert [energy_rank(s, e) for e in (0.1, 9 / 14, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 3, 3]


def test_non_reducing_factorisation_is_skipped_and_noted() -> None:
    base, model, ctx = _apply(LowRankSpec(rank={"fc2": 10, "conv1": "energy:1.0"}), width=8)
    assert type(model.fc2) is nn.Linear and type(model.conv1) is nn.Conv2d
    assert torch.equal(model.fc2.weight, base.fc2.weight)
    skipped = _skipped(ctx)
    assert set(skipped) == {"fc2", "conv1"}
    assert "would not reduce" in skipped["fc2"]["message"]
    assert not _factored(ctx)


def test_fraction_below_the_smallest_rank_is_skipped() -> None:
    _, model, ctx = _apply(LowRankSpec(rank={"fc2": 0.1}), width=8)
    assert type(model.fc2) is nn.Linear
    assert "no rank keeps" in _skipped(ctx)["fc2"]["message"]


def test_grouped_and_parametrised_layers_are_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(64, 32))
    parametrize.register_parametrization(model[3], "weight", WeightMask(torch.rand(32, 64) > 0.5))
    ctx = techniques.Context(example_inputs=torch.randn(2, 8, 6, 6))
    model = techniques.apply_spec(model, LowRankSpec(rank=0.3), ctx)
    assert set(_skipped(ctx)) == {"0", "3"}
    assert "groups=8" in _skipped(ctx)["0"]["message"]
    assert isinstance(model[1], nn.Sequential) and parametrize.is_parametrized(model[3])
    assert model(ctx.example_inputs).shape == (2, 32)


def test_tensorly_backend_is_left_alone() -> None:
    import tensorly as tl

    before = tl.get_backend()
    _apply(LowRankSpec(rank=0.5, conv_method="cp"), width=4)
    assert tl.get_backend() == before


def test_factored_layers_keep_dtype_and_leave_rng_alone() -> None:
    layer = nn.Conv2d(4, 8, 3).double()
    state = torch.get_rng_state()
    new = factor_conv_tucker(layer, (2, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.dtype == torch.float64 for p in new.parameters())


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_factored_model_rebuilds_from_structure_record(method: str) -> None:
    from orchestrator.artifacts.structure import describe, rebuild

    _, model, ctx = _apply(LowRankSpec(rank=0.5, conv_method=method), width=8)
    rebuilt = rebuild(seeded(TinyCNN, width=8), describe(model, seeded(TinyCNN, width=8)))
    rebuilt.load_state_dict(model.state_dict())
    x = ctx.example_inputs
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_rank_bound_and_message() -> None:
    LowRankSpec(rank=MAX_RANK)  # the bound itself is valid
    with pytest.raises(
        techniques.SpecError, match=rf"rank for layer 'fc1' must be an int in \[1, {MAX_RANK}\].*got {MAX_RANK + 1}"
    ):
        LowRankSpec(rank={"fc1": MAX_RANK + 1})
    with pytest.raises(techniques.SpecError, match=r"'conv2'.*got 8\.0"):
        LowRankSpec(rank={"conv2": 8.0})

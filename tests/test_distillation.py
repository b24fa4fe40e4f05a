"""Distillation: the technique contract, recovery of a damaged student, masks, budgets, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import techniques
from techniques._base import WeightMask
from techniques.distillation import (
    MAX_EPOCHS,
    MAX_FEATURE_WEIGHT,
    MAX_LR,
    MAX_STEPS,
    MAX_TEMPERATURE,
    MAX_WEIGHT_DECAY,
    MIN_TEMPERATURE,
    DistillationSpec,
    distill,
    kd_loss,
)
from tests.technique_contract import TechniqueContract, make_context
from tests.tiny_models import TinyCNN, seeded, tiny_data


class TestDistillationContract(TechniqueContract):
    bad_spec_data = [
        {"temperature": 0},
        {"temperature": -1.0},
        {"temperature": "hot"},
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"epochs": -1},
        {"epochs": 1.5},
        {"epochs": 0},
        {"epochs": 0, "steps": 0},
        {"steps": -2},
        {"lr": 0.0},
        {"weight_decay": -1e-4},
        {"feature_layers": [""]},
        {"feature_layers": "conv1"},
        {"feature_weight": -1.0, "feature_layers": ["conv1"]},
        {"feature_weight": 1.0},
        {"temprature": 2.0},
        # non-finite numbers and bools are never numbers
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": True},
        {"alpha": float("nan")},
        {"alpha": True},
        {"lr": float("nan")},
        {"lr": float("inf")},
        {"lr": True},
        {"weight_decay": float("nan")},
        {"weight_decay": float("inf")},
        {"feature_weight": float("inf"), "feature_layers": ["conv1"]},
        {"feature_weight": float("nan"), "feature_layers": ["conv1"]},
        # bounds
        {"temperature": 1e-300},  # gave a NaN loss
        {"temperature": MIN_TEMPERATURE / 2},
        {"temperature": MAX_TEMPERATURE * 2},
        {"lr": MAX_LR * 1.5},
        {"lr": 1e300},
        {"weight_decay": MAX_WEIGHT_DECAY * 2},
        {"feature_weight": MAX_FEATURE_WEIGHT * 10, "feature_layers": ["conv1"]},
        {"epochs": MAX_EPOCHS + 1},
        {"epochs": 10**30},
        {"epochs": 1, "steps": MAX_STEPS + 1},
        {"epochs": 0, "steps": 10**30},
        # integral floats are not integers
        {"epochs": 2.0},
        {"epochs": 0, "steps": 5.0},
        {"epochs": True},
        {"epochs": 1, "steps": True},
        {"epochs": 1, "steps": -1},
        # a layer named twice crashed the feature loss
        {"feature_layers": ["conv1", "conv1"], "feature_weight": 1.0},
    ]

    def make_spec(self) -> DistillationSpec:
        return DistillationSpec(epochs=1, lr=1e-3)

    def unknown_layer_spec(self) -> DistillationSpec:
        return DistillationSpec(epochs=1, feature_layers=("no_such_layer",), feature_weight=1.0)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    """TinyCNN(width=8) fitted to the tiny data (100% training accuracy)."""
    x, y = tiny_data(64, seed=0)
    model = seeded(TinyCNN, width=8).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _damaged(teacher: nn.Module, scale: float = 1.0) -> nn.Module:
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return student


def _context(teacher: nn.Module, seed: int = 0) -> tuple[techniques.Context, list[tuple[int, float]]]:
    ctx = make_context(seed, teacher=teacher)
    calls: list[tuple[int, float]] = []
    ctx.on_epoch = lambda epoch, metric: calls.append((epoch, metric))
    return ctx, calls


def test_damaged_student_recovers_and_reports_each_epoch(teacher: nn.Module) -> None:
    ctx, calls = _context(teacher)
    assert ctx.evaluate(teacher) == 1.0
    student = _damaged(teacher)
    before = ctx.evaluate(student)
    student = techniques.apply_spec(student, DistillationSpec(epochs=6, lr=3e-3), ctx)
    after = ctx.evaluate(student)
    assert before < 0.6 and after >= 0.9 and after > before + 0.3
    assert not student.training
    assert [epoch for epoch, _ in calls] == list(range(6))
    assert calls[-1][1] == after
    losses = ctx.notes[-1]["epoch_losses"]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]


def test_masks_keep_pruned_weights_at_zero(teacher: nn.Module) -> None:
    student = _damaged(teacher)
    gen = torch.Generator().manual_seed(2)
    masks = {}
    for name in ("conv2", "fc1"):
        layer = student.get_submodule(name)
        masks[name] = torch.rand(layer.weight.shape, generator=gen) > 0.5
        parametrize.register_parametrization(layer, "weight", WeightMask(masks[name]))
    originals = {n: student.get_submodule(n).parametrizations.weight.original.detach().clone() for n in masks}
    ctx, _ = _context(teacher)
    distill(student, teacher, DistillationSpec(epochs=2, lr=3e-3), ctx)
    for name, mask in masks.items():
        layer = student.get_submodule(name)
        assert parametrize.is_parametrized(layer, "weight")
        assert torch.count_nonzero(layer.weight[~mask]) == 0
        assert not torch.equal(layer.parametrizations.weight.original[mask], originals[name][mask])


def test_smaller_architecture_learns_with_feature_projection(teacher: nn.Module) -> None:
    student = seeded(TinyCNN, seed=2, width=4)
    ctx, calls = _context(teacher)
    before = ctx.evaluate(student)
    spec = DistillationSpec(epochs=10, lr=1e-2, feature_layers=("conv2",), feature_weight=0.5)
    student = distill(student, teacher, spec, ctx)
    assert before < 0.3 and ctx.evaluate(student) >= 0.7
    assert len(calls) == 10
    # The 8→16-channel projection is training-only: the student keeps exactly its own parameters.
    assert student.state_dict().keys() == TinyCNN(width=4).state_dict().keys()


def test_mlp_feature_projection_is_linear(teacher: nn.Module) -> None:
    def mlp(hidden: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    torch.manual_seed(0)
    big, small = mlp(32), mlp(8)
    ctx, calls = _context(big)
    spec = DistillationSpec(epochs=3, lr=1e-2, feature_layers=("1",), feature_weight=1.0)
    before = ctx.evaluate(small)
    distill(small, big, spec, ctx)
    assert len(calls) == 3 and ctx.notes[-1]["epoch_losses"][-1] < ctx.notes[-1]["epoch_losses"][0]
    assert ctx.evaluate(small) > before
    with pytest.raises(ValueError, match="only the channel count"):
        conv = nn.Sequential(nn.Identity(), nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10))
        distill(mlp(8), conv, DistillationSpec(feature_layers=("1",), feature_weight=1.0), ctx)


def test_deterministic_and_caller_rng_untouched(teacher: nn.Module) -> None:
    spec = DistillationSpec(epochs=1, feature_layers=("conv2", "fc1"), feature_weight=0.1)
    state = torch.get_rng_state()
    runs = [distill(_damaged(teacher), teacher, spec, _context(teacher, seed)[0]) for seed in (3, 3)]
    assert torch.equal(torch.get_rng_state(), state)
    a, b = (run.state_dict() for run in runs)
    assert all(torch.equal(a[key], b[key]) for key in a)
    # Another seed draws other batches and another projection init.
    other = distill(_damaged(teacher), teacher, spec, _context(teacher, 4)[0]).state_dict()
    assert not torch.equal(other["fc1.weight"], a["fc1.weight"])


def test_step_budget_stops_mid_epoch(teacher: nn.Module) -> None:
    ctx, calls = _context(teacher)
    drawn: list[int] = []
    batches = ctx.train_batches

    def counting(epoch: int):
        for batch in batches(epoch):
            drawn.append(epoch)
            yield batch

    ctx.train_batches = counting
    distill(_damaged(teacher), teacher, DistillationSpec(epochs=0, steps=6), ctx)
    assert drawn == [0, 0, 0, 0, 1, 1]
    assert [epoch for epoch, _ in calls] == [0, 1]
    assert "6 step(s)" in ctx.notes[-1]["message"]


def test_teacher_is_left_unchanged(teacher: nn.Module) -> None:
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    try:
        distill(_damaged(teacher), teacher, DistillationSpec(epochs=1), _context(teacher)[0])
        assert teacher.training
    finally:
        teacher.eval()
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())


def test_missing_context_and_mismatched_outputs_raise(teacher: nn.Module) -> None:
    spec = DistillationSpec(epochs=1)
    ctx = make_context()
    with pytest.raises(ValueError, match="no teacher"):
        techniques.apply_spec(seeded(TinyCNN), spec, ctx)
    ctx = make_context(teacher=teacher)
    ctx.train_batches = None
    with pytest.raises(ValueError, match="train_batches"):
        techniques.apply_spec(seeded(TinyCNN), spec, ctx)
    with pytest.raises(ValueError, match="must match"):
        distill(seeded(TinyCNN, classes=5), teacher, spec, make_context())
    ctx = make_context()
    ctx.task_loss = None
    with pytest.raises(ValueError, match="task_loss"):
        distill(seeded(TinyCNN), teacher, spec, ctx)
    distill(seeded(TinyCNN), teacher, DistillationSpec(epochs=1, alpha=1.0), ctx)  # pure KD needs no labels
    broken = nn.Sequential(seeded(TinyCNN), nn.Hardtanh(float("nan"), float("nan")))
    with pytest.raises(FloatingPointError, match="loss became nan"):
        distill(seeded(TinyCNN), broken, spec, make_context())


def test_kd_loss() -> None:
    logits = torch.randn(6, 10)
    assert float(kd_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, logits.flip(0), 4.0)) > 0
    dense = torch.randn(2, 10, 3, 3)  # per-pixel classes (segmentation-shaped outputs)
    assert float(kd_loss(dense, dense.flip(0), 2.0)) > 0


def test_spec_with_feature_layers_round_trips() -> None:
    spec = DistillationSpec(epochs=0, steps=10, feature_layers=["conv2", "fc1"], feature_weight=0.3)
    assert spec.feature_layers == ("conv2", "fc1")
    assert techniques.spec_from_json(spec.to_json()) == spec


@pytest.mark.gpu
def test_runs_on_cuda(teacher: nn.Module) -> None:
    ctx, calls = _context(copy.deepcopy(teacher))
    ctx.device = torch.device("cuda")
    x, y = tiny_data(64, seed=0)
    ctx.evaluate = lambda model: float((model(x.cuda()).argmax(1) == y.cuda()).float().mean())
    student = distill(_damaged(teacher), ctx.teacher, DistillationSpec(epochs=1), ctx)
    assert next(student.parameters()).device.type == "cuda" and len(calls) == 1


def test_bound_messages_name_the_field() -> None:
    with pytest.raises(techniques.SpecError, match=r"temperature must be in \[0\.05, 100\.0\], got 1e-300"):
        DistillationSpec(temperature=1e-300)
    with pytest.raises(techniques.SpecError, match=rf"epochs must be an integer in \[0, {MAX_EPOCHS}\]"):
        DistillationSpec(epochs=10**30)
    with pytest.raises(techniques.SpecError, match=r"lr must be in \(0, 1\.0\], got 2"):
        DistillationSpec(lr=2)
    with pytest.raises(techniques.SpecError, match="feature_layers names 'conv1' more than once"):
        DistillationSpec(feature_layers=("conv1", "fc1", "conv1"), feature_weight=1.0)


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": MIN_TEMPERATURE, "epochs": 1},
        {"temperature": MAX_TEMPERATURE, "epochs": 1},
        {"epochs": 0, "steps": 1},
        {"epochs": MAX_EPOCHS, "steps": 1},
        {"epochs": 1, "steps": MAX_STEPS},
        {"epochs": 1, "lr": MAX_LR, "weight_decay": MAX_WEIGHT_DECAY},
        {"epochs": 1, "alpha": 0, "lr": 1},
        {"epochs": 1, "alpha": 1, "temperature": 1},
        {"epochs": 1, "feature_layers": ["conv2", "fc1"], "feature_weight": MAX_FEATURE_WEIGHT},
    ],
)
def test_boundary_values_apply_with_finite_outputs(settings: dict) -> None:
    ctx = make_context(teacher=seeded(TinyCNN, seed=1))
    spec = DistillationSpec.from_data(settings)
    model = techniques.apply_spec(seeded(TinyCNN), spec, ctx)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(ctx.example_inputs)).all()


def test_feature_layers_named_like_module_dict_methods_train(teacher: nn.Module) -> None:
    class Named(nn.Module):  # layer names that are also nn.ModuleDict attributes
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.update = nn.Linear(64, hidden)
            self.items = nn.Linear(hidden, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.items(torch.relu(self.update(x.flatten(1))))

    torch.manual_seed(0)
    big, small = Named(32), Named(8)
    ctx, calls = _context(big)
    spec = DistillationSpec(epochs=2, lr=1e-2, feature_layers=("update",), feature_weight=1.0)
    distill(small, big, spec, ctx)
    assert len(calls) == 2 and torch.isfinite(small(tiny_data(4)[0])).all()

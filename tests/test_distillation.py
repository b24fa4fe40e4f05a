"""Distillation: the technique contract, recovery of a damaged student, masks, budgets, determinism, the output
losses (kl, cosine, mse, the workload's own), feature maps between models of different depth, dict inputs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import techniques
from orchestrator.testing import TechniqueContract, make_context
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
    output_loss,
)
from techniques.tools.inputs import first_rows, take_rows
from tests.tiny_models import DictInputNet, TinyCNN, dict_data, seeded, text_data, tiny_bert, tiny_data


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
        # output losses
        {"loss": "kld"},
        {"loss": "KL"},
        {"loss": ""},
        {"loss": None},
        {"loss": 1},
        {"loss": ["kl"]},
        {"loss": {"kl": 1}},
        # feature maps: an object of non-empty layer names, student layers named once
        {"feature_map": "conv1"},
        {"feature_map": ["conv1", "conv2"]},
        {"feature_map": [["conv1", "conv2"]]},
        {"feature_map": {"conv1": ""}},
        {"feature_map": {"": "conv1"}},
        {"feature_map": {"conv1": 3}},
        {"feature_map": {"conv1": None}},
        {"feature_map": {"conv1": ["conv2"]}},
        {"feature_map": {1: "conv1"}},
        {"feature_map": 7},
        {"feature_layers": ["conv1"], "feature_map": {"conv1": "conv2"}, "feature_weight": 1.0},
        {"feature_map": {}, "feature_weight": 1.0},
    ]

    edge_spec_data = [
        {"temperature": MIN_TEMPERATURE, "epochs": 1},
        {"temperature": MAX_TEMPERATURE, "epochs": 1},
        {"epochs": 0, "steps": 1},
        {"epochs": MAX_EPOCHS, "steps": 1},
        {"epochs": 1, "steps": MAX_STEPS},
        {"epochs": 1, "lr": MAX_LR, "weight_decay": MAX_WEIGHT_DECAY},
        {"epochs": 1, "alpha": 0, "lr": 1},
        {"epochs": 1, "alpha": 1, "temperature": 1},
        {"epochs": 1, "feature_layers": ["conv2", "fc1"], "feature_weight": MAX_FEATURE_WEIGHT},
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


def _learning_rates(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The learning rate of every optimiser step distill takes, as it steps."""
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return seen


@pytest.mark.parametrize(
    ("budget", "count"), [({"epochs": 0, "steps": 8}, 8), ({"epochs": 3}, 12), ({"epochs": 2, "steps": 6}, 6)]
)
def test_a_cosine_schedule_decays_the_rate_to_zero_over_whichever_budget_ends_first(
    teacher: nn.Module, monkeypatch: pytest.MonkeyPatch, budget: dict, count: int
) -> None:
    seen = _learning_rates(monkeypatch)  # the tiny data is 4 batches an epoch
    distill(_damaged(teacher), teacher, DistillationSpec(lr=0.01, schedule="cosine", **budget), _context(teacher)[0])
    assert len(seen) == count and seen[0] == 0.01
    assert all(later < earlier for earlier, later in zip(seen[4:], seen[5:], strict=False))  # smooth after epoch 0
    assert all(later <= earlier for earlier, later in zip(seen, seen[1:], strict=False))
    if budget.get("steps"):  # step budgets are known from the first step: a half cosine over the steps
        steps = budget["steps"]
        assert seen == pytest.approx([0.005 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)])
    else:  # an epoch budget: the first epoch at the full rate, then a half cosine of the epochs spent
        assert seen[:4] == [0.01] * 4 and seen[4] == pytest.approx(0.005 * (1 + math.cos(math.pi / 3)))
    assert seen[-1] < 0.1 * 0.01


def test_a_constant_schedule_keeps_the_rate(teacher: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _learning_rates(monkeypatch)
    distill(_damaged(teacher), teacher, DistillationSpec(epochs=2, lr=0.01), _context(teacher)[0])
    assert seen == [0.01] * 8 and DistillationSpec().schedule == "constant"  # documents without it: as before
    with pytest.raises(techniques.SpecError, match="schedule must be one of 'constant', 'cosine'"):
        DistillationSpec(schedule="linear")


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


# --------------------------------------------------------------------------- spec: new fields, old documents

OLD_DOCUMENT = {  # a distillation step as checkpoints wrote it before `loss` and `feature_map` existed
    "_type": "distillation",
    "_version": 1,
    "_data": {
        "temperature": 4.0,
        "alpha": 0.7,
        "epochs": 8,
        "steps": None,
        "lr": 0.001,
        "weight_decay": 0.0,
        "feature_layers": [],
        "feature_weight": 0.0,
    },
}


def test_old_documents_without_the_new_fields_load_with_old_behaviour() -> None:
    spec = techniques.spec_from_json(OLD_DOCUMENT)
    assert isinstance(spec, DistillationSpec)
    assert spec == DistillationSpec(epochs=8) and spec.loss == "kl" and spec.feature_map == ()
    from orchestrator.policy import Policy

    policy = Policy.from_json({"_type": "policy", "_version": 1, "seed": 0, "steps": [OLD_DOCUMENT]})
    assert policy.steps == (spec,)


def test_feature_map_is_a_json_object_and_round_trips() -> None:
    spec = DistillationSpec(loss="cosine", feature_map={"fc1": "fc2", "conv1": "conv2"}, feature_weight=0.5)
    assert spec.feature_map == (("fc1", "fc2"), ("conv1", "conv2"))
    doc = spec.to_json()
    assert doc["_data"]["feature_map"] == {"fc1": "fc2", "conv1": "conv2"} and doc["_data"]["loss"] == "cosine"
    assert techniques.spec_from_json(json.loads(json.dumps(doc))) == spec
    both = DistillationSpec(feature_layers=("conv2",), feature_map={"fc1": "fc2"}, feature_weight=1.0)
    assert both.feature_pairs == (("conv2", "conv2"), ("fc1", "fc2"))
    hash(both)  # specs stay hashable


def test_new_field_messages_name_the_field() -> None:
    with pytest.raises(techniques.SpecError, match=r"loss must be one of 'kl', 'cosine', 'mse', got 'l1'"):
        DistillationSpec(loss="l1")
    with pytest.raises(techniques.SpecError, match="feature_map must be an object of student layer"):
        DistillationSpec(feature_map={1: "conv1"}, feature_weight=1.0)  # type: ignore[dict-item]
    with pytest.raises(techniques.SpecError, match="feature_map names 'fc1' more than once"):
        DistillationSpec(feature_map=(("fc1", "fc2"), ("fc1", "conv2")), feature_weight=1.0)
    with pytest.raises(techniques.SpecError, match="'conv2' in both feature_layers and feature_map"):
        DistillationSpec(feature_layers=("conv2",), feature_map={"conv2": "conv1"})
    with pytest.raises(techniques.SpecError, match="needs feature_layers or feature_map"):
        DistillationSpec(feature_weight=1.0)


def test_a_teacher_layer_the_teacher_lacks_is_rejected(teacher: nn.Module) -> None:
    spec = DistillationSpec(epochs=1, feature_map={"conv2": "no_such_layer"}, feature_weight=1.0)
    with pytest.raises(techniques.SpecError, match="'no_such_layer' is not a module of the teacher"):
        techniques.apply_spec(seeded(TinyCNN), spec, make_context(teacher=teacher))


# --------------------------------------------------------------------------- output losses


def _old_kd_fine_tune(student: nn.Module, teacher: nn.Module, spec: DistillationSpec, ctx: techniques.Context) -> None:
    """The fine-tune as it was before `loss` existed: α·T²·KL(softmax) + (1−α)·cross entropy, AdamW."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        optimizer = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        temperature = spec.temperature
        for epoch in range(spec.epochs):
            student.train()
            for x, y in ctx.train_batches(epoch):
                with torch.no_grad():
                    t = teacher(x)
                s = student(x)
                kl = nn.functional.kl_div(
                    nn.functional.log_softmax(s / temperature, dim=1),
                    nn.functional.log_softmax(t / temperature, dim=1),
                    log_target=True,
                    reduction="batchmean",
                )
                loss = spec.alpha * (kl * temperature**2) + (1 - spec.alpha) * nn.functional.cross_entropy(s, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


@pytest.mark.parametrize("spec", [DistillationSpec(epochs=2), DistillationSpec(epochs=2, loss="kl", alpha=0.4)])
def test_kl_is_the_old_loss_bit_for_bit(teacher: nn.Module, spec: DistillationSpec) -> None:
    expected = _damaged(teacher)
    _old_kd_fine_tune(expected, teacher, spec, make_context(5))
    got = distill(_damaged(teacher), teacher, spec, make_context(5))
    a, b = expected.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_output_loss_values() -> None:
    a = torch.randn(6, 16)
    assert float(output_loss("cosine", a, a, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(output_loss("cosine", a, -a, 4.0)) == pytest.approx(2.0, abs=1e-6)
    assert float(output_loss("cosine", 3 * a, a, 4.0)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(output_loss("mse", a, a + 0.5, 4.0)) == pytest.approx(0.25)
    assert torch.equal(output_loss("kl", a, a.flip(0), 2.0), kd_loss(a, a.flip(0), 2.0))
    with pytest.raises(ValueError, match="use loss 'mse' for regression"):
        kd_loss(a[:, 0], a[:, 1], 2.0)


class Embedder(nn.Module):
    """An MLP from 1×8×8 inputs to a 16-d embedding (no classes: KL over dim 1 would mean nothing)."""

    def __init__(self, hidden: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _label_free_context(inputs, n: int, example) -> techniques.Context:
    """Batches of 16 with no labels (targets None), no task loss, no evaluation."""

    def batches(epoch: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, 16):
            yield take_rows(inputs, order[i : i + 16]), None

    return techniques.Context(example_inputs=example, train_batches=batches, task_loss=None)


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_embedding_losses_bring_the_student_to_the_teacher(loss: str) -> None:
    x, _ = tiny_data(64, seed=0)
    teacher, student = seeded(Embedder, seed=0), seeded(Embedder, seed=1, hidden=8)
    with torch.no_grad():
        before = float(output_loss(loss, student(x), teacher(x), 1.0))
    ctx = _label_free_context(x, 64, x[:4])
    distill(student, teacher, DistillationSpec(loss=loss, alpha=1.0, epochs=15, lr=1e-2), ctx)
    losses = ctx.notes[-1]["epoch_losses"]
    assert ctx.notes[-1]["output_loss"] == loss
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        assert float(output_loss(loss, student(x), teacher(x), 1.0)) < 0.5 * before


def test_mse_distils_a_regression_output() -> None:
    x, _ = tiny_data(64, seed=0)
    teacher, student = seeded(Embedder, seed=0, dim=1), seeded(Embedder, seed=1, dim=1)
    scalar = nn.Flatten(0)  # N×1 → N: one number per example
    ctx = _label_free_context(x, 64, x[:4])
    distill(
        nn.Sequential(student, scalar), nn.Sequential(teacher, scalar), DistillationSpec(loss="mse", alpha=1.0), ctx
    )
    losses = ctx.notes[-1]["epoch_losses"]
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="use loss 'mse'"):
        distill(nn.Sequential(student, scalar), nn.Sequential(teacher, scalar), DistillationSpec(alpha=1.0), ctx)


def test_the_workload_loss_replaces_the_built_in_one(teacher: nn.Module) -> None:
    calls = []

    def loss_fn(student_out: torch.Tensor, teacher_out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        calls.append((student_out, teacher_out, batch))
        return 0.0 * student_out.sum()  # no gradient at all: the built-in KL must not be used

    ctx = make_context(teacher=teacher)
    ctx.distill_loss = loss_fn
    seen = []
    batches = ctx.train_batches
    ctx.train_batches = lambda epoch: ((seen.append(x) or x, y) for x, y in batches(epoch))
    student = _damaged(teacher)
    state = {k: v.clone() for k, v in student.state_dict().items() if "running" not in k and "num_batches" not in k}
    techniques.apply_spec(student, DistillationSpec(epochs=1, alpha=1.0, loss="cosine"), ctx)
    assert len(calls) == len(seen) == 4
    for (student_out, teacher_out, batch), x in zip(calls, seen, strict=True):
        assert batch is x and student_out.requires_grad and not teacher_out.requires_grad
        assert student_out.shape == teacher_out.shape == (16, 10)
        with torch.no_grad():
            assert torch.equal(teacher_out, teacher(x))
    assert all(torch.equal(student.state_dict()[k], v) for k, v in state.items())
    assert "the workload's distill_loss" in ctx.notes[0]["message"] and ctx.notes[-1]["output_loss"] == "workload"


def test_the_workload_loss_mixes_with_the_task_loss_and_must_be_a_scalar(teacher: nn.Module) -> None:
    ctx = make_context(teacher=teacher)
    ctx.distill_loss = lambda s, t, batch: nn.functional.mse_loss(s, t)
    student = _damaged(teacher)
    before = ctx.evaluate(student)
    student = distill(student, teacher, DistillationSpec(epochs=6, alpha=0.5, lr=3e-3), ctx)
    losses = ctx.notes[-1]["epoch_losses"]
    assert losses[-1] < 0.5 * losses[0] and ctx.evaluate(student) > before + 0.2
    ctx.distill_loss = lambda s, t, batch: (s - t) ** 2
    with pytest.raises(ValueError, match="one-element tensor"):
        distill(_damaged(teacher), teacher, DistillationSpec(epochs=1), ctx)


# --------------------------------------------------------------------------- feature maps, any inputs


def _text_context(seed: int = 0) -> techniques.Context:
    inputs, targets = text_data(32, seed=seed)

    def batches(epoch: int):
        order = torch.randperm(32, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, 32, 8):
            yield take_rows(inputs, order[i : i + 8]), targets[order[i : i + 8]]

    return techniques.Context(
        example_inputs=first_rows(inputs, 4), seed=seed, train_batches=batches, task_loss=nn.functional.cross_entropy
    )


@pytest.mark.parametrize("hidden", [32, 16])  # as wide as the teacher, and narrower (through a projection)
def test_feature_map_distils_a_deeper_bert_into_a_shallower_one(hidden: int) -> None:
    pytest.importorskip("transformers")
    teacher = tiny_bert(seed=0)  # 2 layers
    student = tiny_bert(seed=1, num_hidden_layers=1, hidden_size=hidden, intermediate_size=2 * hidden)
    spec = DistillationSpec(
        epochs=8,
        lr=3e-3,
        feature_map={"bert.embeddings": "bert.embeddings", "bert.encoder.layer.0": "bert.encoder.layer.1"},
        feature_weight=1.0,
    )
    ctx = _text_context()
    ctx.teacher = teacher
    keys = student.state_dict().keys()
    student = techniques.apply_spec(student, spec, ctx)
    note = ctx.notes[-1]
    features = note["epoch_feature_losses"]
    assert len(features) == 8 and all(math.isfinite(v) for v in features)
    assert features[-1] < 0.7 * features[0]
    assert note["epoch_losses"][-1] < note["epoch_losses"][0]
    assert student.state_dict().keys() == keys  # the projections are training-only


class TupleBlock(nn.Module):
    """A layer returning `(hidden, attention)` as older Hugging Face layers do."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(64, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.relu(self.linear(x.flatten(1))), None


class TupleNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.block = TupleBlock(width)
        self.head = nn.Linear(width, 10)
        self.empty = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.empty(None)  # a layer with no tensor output
        return self.head(self.block(x)[0])


def test_feature_hooks_take_the_first_tensor_of_a_tuple_output() -> None:
    torch.manual_seed(0)
    teacher, student = TupleNet(32), TupleNet(8)
    ctx = make_context(teacher=teacher)
    spec = DistillationSpec(epochs=3, lr=1e-2, feature_layers=("block",), feature_weight=1.0)
    distill(student, teacher, spec, ctx)
    features = ctx.notes[-1]["epoch_feature_losses"]
    assert all(math.isfinite(v) for v in features) and features[-1] < features[0]
    with pytest.raises(techniques.SpecError, match="'empty' of the student does not output a tensor"):
        distill(student, teacher, DistillationSpec(feature_layers=("empty",), feature_weight=1.0), ctx)


def test_dict_input_model_distils() -> None:
    inputs, targets = dict_data(64, seed=0)
    teacher = seeded(DictInputNet, seed=0)
    student = seeded(DictInputNet, seed=1)

    def batches(epoch: int):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 64, 16):
            yield take_rows(inputs, order[i : i + 16]), targets[order[i : i + 16]]

    def agreement(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(**inputs)["logits"].argmax(1) == teacher(**inputs)["logits"].argmax(1)).float().mean())

    ctx = techniques.Context(
        example_inputs=first_rows(inputs, 4),
        train_batches=batches,
        task_loss=nn.functional.cross_entropy,
        evaluate=agreement,
        teacher=teacher,
    )
    before = agreement(student)
    spec = DistillationSpec(epochs=6, alpha=1.0, lr=3e-3, feature_layers=("extra",), feature_weight=0.1)
    student = techniques.apply_spec(student, spec, ctx)
    losses = ctx.notes[-1]["epoch_losses"]
    assert losses[-1] < 0.7 * losses[0] and agreement(student) > before + 0.5


# --------------------------------------------------------------------------- budgets and the search


@pytest.mark.parametrize(("epochs", "steps", "drawn"), [(1, 100, [0, 0, 0, 0]), (3, 6, [0, 0, 0, 0, 1, 1])])
def test_epochs_and_steps_stop_at_whichever_comes_first(teacher: nn.Module, epochs: int, steps: int, drawn) -> None:
    ctx, calls = _context(teacher)
    seen: list[int] = []
    batches = ctx.train_batches
    ctx.train_batches = lambda epoch: ((seen.append(epoch), b)[1] for b in batches(epoch))
    distill(_damaged(teacher), teacher, DistillationSpec(epochs=epochs, steps=steps), ctx)
    assert seen == drawn and len(calls) == drawn[-1] + 1


def test_search_declares_step_budgets_off_by_default() -> None:
    declared = {g.setting: g for g in techniques.get("distillation").search.globals}
    assert declared["epochs"].choices == (2, 4, 8)
    assert declared["steps"].choices == (0,)  # 0: no step budget, so the default search is by epochs alone
    for steps in declared["steps"].choices:
        assert DistillationSpec(steps=steps).steps == 0


def test_steps_searched_as_integer_choices_by_optuna() -> None:
    optuna = pytest.importorskip("optuna")
    from orchestrator.search.space import SpaceOptions, build_space

    options = SpaceOptions(ranges={"distillation": {"epochs": (0,), "steps": (100, 200, 400)}})
    space = build_space(seeded(TinyCNN), options)
    default = build_space(seeded(TinyCNN))
    assert default.ranges["distillation"]["steps"] == (0,) and default.max_epochs() == 8
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        space.define(trial)
        step = space.policy(trial.params).steps[-1]
        assert isinstance(step, DistillationSpec) and step.epochs == 0 and type(step.steps) is int
        seen.add(step.steps)
        study.tell(trial, 0.0)
    assert seen == {100, 200, 400}
    references = [params for _, role, params in space.fixed_points() if role == "reference"]
    assert references and all(params["distill.steps"] == 400 for params in references)


def test_a_space_file_offers_the_cosine_schedule_and_the_default_keeps_the_rate_constant() -> None:
    optuna = pytest.importorskip("optuna")
    from orchestrator.errors import UserError
    from orchestrator.search.space import build_space
    from orchestrator.search.space_options import options_from_json

    assert build_space(seeded(TinyCNN)).ranges["distillation"]["schedule"] == ("constant",)
    space = build_space(seeded(TinyCNN), options_from_json({"distillation": {"schedule": ["constant", "cosine"]}}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        space.define(trial)
        steps = space.policy(trial.params).steps
        if steps:
            seen.add(steps[-1].schedule)
        study.tell(trial, 0.0)
    assert seen == {"constant", "cosine"}
    with pytest.raises(UserError, match=r"distillation.schedule\[0\]: .* one of 'constant', 'cosine', got 'linear'"):
        options_from_json({"distillation": {"schedule": ["linear"]}})

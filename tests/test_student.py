"""Student technique: a lighter architecture from the workload, distilled from the teacher, searched as a family."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
import torch
from torch import nn

import techniques
from orchestrator import executor
from orchestrator.artifacts import store
from orchestrator.policy import Policy, PolicyError, validate_for_model
from orchestrator.search.space import COMBINATION, SpaceError, build_space
from orchestrator.search.space_options import SpaceOptions
from orchestrator.testing import TechniqueContract, make_context
from orchestrator.workloads.digits import DigitsCNN
from techniques.distillation import DistillationSpec
from techniques.packed.layers import INT_KERNEL, PackedConv2d
from techniques.quantization import W8A8, QuantizationSpec
from techniques.student import StudentSpec, copy_leading_slices, require_fine_tune
from tests.tiny_models import TinyCNN, seeded


def tiny_student(width: float) -> nn.Module:
    return TinyCNN(width=max(1, round(8 * width)))


def _context(seed: int = 0, teacher: nn.Module | None = None) -> techniques.Context:
    ctx = make_context(seed, teacher=teacher)
    ctx.build_student = tiny_student
    return ctx


class TestStudentContract(TechniqueContract):
    bad_spec_data = [
        {},
        {"width": 0},
        {"width": 1},
        {"width": 1.5},
        {"width": -0.5},
        {"width": True},
        {"width": "0.5"},
        {"width": float("nan")},
        {"width": 0.5, "init": "zeros"},
        {"width": 0.5, "unknown": 1},
    ]

    edge_spec_data = [{"width": 1e-9}, {"width": 0.999}, {"width": 1e-9, "init": "random"}]

    def make_spec(self) -> techniques.TechniqueSpec:
        return StudentSpec(width=0.5)

    def build_context(self, seed: int = 0, teacher: nn.Module | None = None) -> techniques.Context:
        return _context(seed, teacher=teacher)


def test_the_student_is_the_narrower_architecture_initialised_from_the_teachers_leading_slices():
    teacher, ctx = seeded(TinyCNN), _context()
    student = techniques.apply_spec(teacher, StudentSpec(width=0.5), ctx)
    assert student is not teacher and student.conv1.out_channels == 4 and student.fc1.in_features == 8 * 16
    assert torch.equal(student.conv1.weight, teacher.conv1.weight[:4])
    assert torch.equal(student.fc1.weight, teacher.fc1.weight[:, : 8 * 16])
    assert torch.equal(student.bn2.running_var, teacher.bn2.running_var[:8])
    note = next(n for n in ctx.notes if n["technique"] == "student")
    assert note["width"] == 0.5 and note["params"] < note["teacher_params"] and note["copied_tensors"] > 0


def test_random_init_is_the_builders_seeded_by_the_context():
    def student(seed: int) -> nn.Module:
        return techniques.apply_spec(seeded(TinyCNN), StudentSpec(width=0.5, init="random"), _context(seed))

    torch.manual_seed(123)  # the caller's RNG state plays no part
    first = student(3)
    torch.manual_seed(456)
    again = student(3).state_dict()
    assert all(torch.equal(tensor, again[key]) for key, tensor in first.state_dict().items())
    assert not torch.equal(first.conv1.weight, student(4).conv1.weight)
    assert not torch.equal(first.conv1.weight, seeded(TinyCNN).conv1.weight[:4])


def test_tensors_that_do_not_fit_keep_the_builders_init():
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    student = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2))  # wider in places: nothing to slice there
    before = student[0].weight.clone()
    assert copy_leading_slices(student, teacher) == 1  # only 1.bias fits; every other tensor has a wider dimension
    assert torch.equal(student[0].weight, before) and torch.equal(student[1].bias, teacher[1].bias)


def test_a_workload_without_a_builder_and_a_student_of_the_wrong_output_are_spec_errors():
    with pytest.raises(techniques.SpecError, match="no build_student"):
        techniques.apply_spec(seeded(TinyCNN), StudentSpec(width=0.5), make_context())
    ctx = _context()
    ctx.build_student = lambda width: TinyCNN(width=4, classes=3)
    with pytest.raises(techniques.SpecError, match=r"outputs \(4, 3\), the teacher \(4, 10\)"):
        techniques.apply_spec(seeded(TinyCNN), StudentSpec(width=0.5), ctx)


def test_a_student_needs_a_fine_tuning_step_after_it():
    with pytest.raises(techniques.SpecError, match="needs a distillation step"):
        require_fine_tune((StudentSpec(width=0.5), QuantizationSpec(bits=8)))
    require_fine_tune((StudentSpec(width=0.5), QuantizationSpec(bits=8), DistillationSpec(epochs=1)))
    require_fine_tune((QuantizationSpec(bits=8),))
    policy = Policy((StudentSpec(width=0.5), DistillationSpec(epochs=1)))
    assert policy.techniques() == ["student", "distillation"]
    assert Policy.loads(policy.dumps()) == policy


# --------------------------------------------------------------------------- the search space


def _sample(space, seed: int) -> dict:
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    space.define(trial)
    return trial.params


def test_the_space_offers_student_widths_only_when_the_workload_builds_students():
    without = build_space(DigitsCNN())
    assert "student" not in without.ranges and not any("student" in c for c in without.combinations())
    space = build_space(DigitsCNN(), build_student=DigitsCNN)
    assert space.ranges["student"]["width"] == (0.25, 0.5, 0.75)
    assert {"student", "student+quantization"} <= set(space.combinations())
    assert len(space.combinations()) == 2**5 - 1
    seen = set()
    for seed in range(40):
        params = _sample(space, seed)
        policy = space.policy(params)
        assert ("student.width" in params) == ("student" in params[COMBINATION].split("+"))
        if "student" in policy.techniques():
            seen.add(params[COMBINATION])
            assert policy.techniques()[0] == "student" and policy.techniques()[-1] == "distillation"
            validate_for_model(policy, DigitsCNN(policy.steps[0].width))
    assert len(seen) >= 4
    alone = space.policy({**_sample(only_distillation(), 0), COMBINATION: "student", "student.width": 0.25})
    assert alone.techniques() == ["student", "distillation"] and alone.steps[0] == StudentSpec(width=0.25)
    assert not any("student" in json.dumps(params) for _, _, params in space.fixed_points())


def only_distillation():
    return build_space(DigitsCNN(), SpaceOptions(families=("student", "distillation")), build_student=DigitsCNN)


def test_asking_for_a_student_the_workload_cannot_build_or_train_is_a_clear_error():
    with pytest.raises(SpaceError, match="student needs a workload with build_student"):
        build_space(DigitsCNN(), SpaceOptions(families=("student", "distillation")))
    with pytest.raises(SpaceError, match="add the fine-tuning family"):
        build_space(DigitsCNN(), SpaceOptions(families=("student", "quantization")), build_student=DigitsCNN)
    only = only_distillation()
    assert only.combinations() == ["student"]
    assert only.policy(_sample(only, 0)).techniques() == ["student", "distillation"]


class Deep(nn.Module):
    """A stack of `depth` hidden Linear layers: a shallower student lacks the teacher's deeper layers."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def test_per_layer_settings_of_a_student_policy_address_only_the_students_layers():
    def shallower(width: float) -> nn.Module:
        return Deep(depth=max(1, round(4 * width)))

    space = build_space(Deep(), SpaceOptions(grouping="layer"), build_student=shallower)
    checked = 0
    for seed in range(60):
        params = _sample(space, seed)
        policy = space.policy(params)
        if "student" not in policy.techniques() or len(policy.steps) < 3:
            continue
        width = policy.steps[0].width
        names = {name for name, _ in shallower(width).named_modules()}
        for step in policy.steps[1:]:
            for layer_map in step.layer_maps().values():
                assert set(layer_map.as_dict()) <= names
        validate_for_model(policy, shallower(width))
        checked += 1
    assert checked >= 5


# --------------------------------------------------------------------------- digits, end to end


STUDENT_POLICY = {
    "_type": "policy",
    "_version": 1,
    "seed": 0,
    "steps": [
        {"_type": "student", "_version": 1, "_data": {"width": 0.5}},
        {"_type": "distillation", "_version": 1, "_data": {"epochs": 1}},
    ],
}


def _policy(*steps: dict) -> Policy:
    return Policy.from_json({**STUDENT_POLICY, "steps": list(steps)})


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    with torch.inference_mode():
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and torch.equal(a(x), b(x))


@pytest.fixture(scope="module")
def student(digits, digits_baseline):
    return executor.apply(Policy.from_json(STUDENT_POLICY), digits, baseline=digits_baseline)


@pytest.mark.slow
def test_a_distilled_half_width_student_is_smaller_and_trained(student, digits_baseline):
    model, metrics = student.model, student.metrics
    assert isinstance(model, DigitsCNN) and model.conv1.out_channels == 16 and model.fc1.out_features == 64
    assert metrics["params"] < sum(p.numel() for p in digits_baseline.parameters()) / 3
    assert metrics["validation"] > 0.8  # chance is 0.1: distillation trained it
    assert metrics["size_bytes"] * 3 < metrics["baseline_size_bytes"]
    assert metrics["techniques"] == ["student", "distillation"]


@pytest.mark.slow
def test_a_students_checkpoint_is_written_against_the_student_and_reloads_bitwise(student, digits, tmp_path):
    path = tmp_path / "student"
    store.save(student.model, student.policy, student.metrics, digits, str(path))
    assert json.loads((path / store.STRUCTURE).read_text())["modules"] == []  # nothing changed after the student
    assert student.metrics["size_bytes"] == sum((path / name).stat().st_size for name in store.ARTIFACT_FILES)
    checkpoint = store.load(str(path), digits)
    assert _same(checkpoint.model, student.model, digits.example_inputs(32))


@pytest.mark.slow
def test_quantization_after_a_student_acts_on_the_students_layers(digits, digits_baseline, tmp_path):
    policy = _policy(
        STUDENT_POLICY["steps"][0],
        {"_type": "quantization", "_version": 1, "_data": {"bits": {"fc1": W8A8, "_default": 4}}},
        STUDENT_POLICY["steps"][1],
    )
    result = executor.apply(policy, digits, baseline=digits_baseline)
    assert isinstance(result.model.conv2, PackedConv2d) and result.model.conv2.out_channels == 32
    assert result.metrics["kernels"]["fc1"] == INT_KERNEL and result.metrics["kernels"]["fc2"] != INT_KERNEL
    assert result.metrics["validation"] > 0.6
    path = tmp_path / "quantized-student"
    store.save(result.model, result.policy, result.metrics, digits, str(path))
    assert result.metrics["size_bytes"] == sum((path / name).stat().st_size for name in store.ARTIFACT_FILES)
    assert _same(store.load(str(path), digits).model, result.model, digits.example_inputs(32))


@pytest.mark.slow
def test_a_student_without_distillation_is_refused_before_any_work(digits):
    def no_baseline():
        raise AssertionError("the baseline was loaded before the policy was checked")

    unloaded = dataclasses.replace(digits, load_baseline=no_baseline)
    policy = _policy(STUDENT_POLICY["steps"][0], {"_type": "quantization", "_version": 1, "_data": {"bits": 8}})
    with pytest.raises(PolicyError, match="needs a distillation step"):
        executor.apply(policy, unloaded)


@pytest.mark.slow
def test_a_workload_without_build_student_refuses_student_policies_and_checkpoints(student, digits, tmp_path):
    plain = dataclasses.replace(digits, build_student=None, load_baseline=lambda: pytest.fail("loaded"))
    with pytest.raises(PolicyError, match="no build_student"):
        executor.apply(Policy.from_json(STUDENT_POLICY), plain)
    path = tmp_path / "student"
    store.save(student.model, student.policy, student.metrics, digits, str(path))
    with pytest.raises(store.CheckpointError, match="does not rebuild: student: the workload has no build_student"):
        store.load(str(path), plain)
    with pytest.raises(store.CheckpointError, match="no build_student"):
        store.save(student.model, student.policy, student.metrics, plain, str(tmp_path / "again"))

"""The search space: built from the model, pure define-by-run, parameters → valid policies."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest

import techniques
from orchestrator.policy import Policy, validate_for_model
from orchestrator.search.space import COMBINATION, NONE, SpaceError, build_space, model_ranges
from orchestrator.search.space_options import SpaceOptions, load_space_file, options_from_json
from orchestrator.workloads.digits import DigitsCNN
from tests.tiny_models import TinyCNN, TinyResNet, tiny_bert


def sample(space, seed: int = 0) -> dict:
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    space.define(trial)
    return trial.params


def test_per_layer_space_of_the_digits_model():
    space = build_space(DigitsCNN())
    assert set(space.groups) == {"lowrank", "structured_pruning", "unstructured_pruning", "quantization"}
    assert list(space.groups["quantization"]) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert "fc2" not in space.groups["structured_pruning"]  # the output layer keeps its features
    assert "conv1" not in space.groups["lowrank"]  # one input channel: nothing to factor
    fine_tuning = len(techniques.get("distillation").search.globals)  # temperature, alpha, epochs, lr, …
    own = sum(len(techniques.get(t).search.globals) for t in space.groups)  # a family's global settings
    assert len(space.parameter_names()) == space.describe()["dimensions"] == 1 + (4 + 4 + 5 + 5) + own + fine_tuning


def test_define_by_run_is_pure_and_every_sample_is_a_valid_policy():
    model = DigitsCNN()
    space = build_space(model)
    for seed in range(25):
        params = sample(space, seed)
        assert params == sample(space, seed)
        policy = space.policy(params)
        validate_for_model(policy, model)
        assert Policy.loads(policy.dumps()) == policy
        if policy.steps:
            assert policy.techniques()[-1] == "distillation"


def test_the_sampler_is_never_offered_the_uncompressed_model():
    space = build_space(DigitsCNN())
    combinations = space.combinations()
    assert len(combinations) == len(set(combinations)) == 2**4 - 1 and NONE not in combinations
    seen = set()
    for seed in range(60):
        params = sample(space, seed)
        seen.add(params[COMBINATION])
        used = set(params[COMBINATION].split("+"))
        assert used and used <= set(space.groups)
        settings = {techniques.get(f).search.per_layer.setting for f in used}
        settings |= {f for f in used if techniques.get(f).search.globals}  # e.g. quantization.algorithm
        assert {name.split(".")[0] for name in params} - {COMBINATION, "distill"} == settings
    assert len(seen) >= 12  # random sampling reaches (nearly) every combination


def test_off_values_leave_layers_alone_and_the_baseline_point_is_empty():
    space = build_space(DigitsCNN())
    fixed = space.fixed_points()
    assert fixed[0] == ("baseline", "baseline", {COMBINATION: NONE}) and space.policy(fixed[0][2]).steps == ()
    points = {name: params for name, _, params in fixed[1:]}
    int8 = space.policy(points["uniform int8"])
    assert int8.techniques() == ["quantization", "distillation"]
    assert set(int8.steps[0].bits.as_dict().values()) == {8}
    assert space.policy(points["50% sparse + int8"]).techniques() == [
        "unstructured_pruning",
        "quantization",
        "distillation",
    ]
    for params in points.values():  # a sampled fixed point names exactly the parameters its families call for
        assert set(params) <= set(space.parameter_names())
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        study.enqueue_trial(params)
        asked = study.ask()
        space.define(asked)
        assert asked.params == params


def test_grouping_by_block_and_type_and_by_regex_groups():
    model = TinyResNet()
    by_type = build_space(model, SpaceOptions(grouping="type"))
    assert set(by_type.groups["quantization"]) == {"Conv2d", "Linear"}
    by_regex = build_space(model, options_from_json({"groups": {"convs": "re:conv_.*", "head": "re:fc"}}))
    assert by_regex.groups["quantization"] == {"convs": ("conv_a", "conv_b"), "head": ("fc",)}
    for seed in range(10):  # one value per group, given to every layer in it
        policy = by_regex.policy(sample(by_regex, seed))
        for step in policy.steps:
            for layer_map in step.layer_maps().values():
                values = layer_map.as_dict()
                assert values.get("conv_a") == values.get("conv_b")


def test_families_can_be_switched_off():
    space = build_space(DigitsCNN(), SpaceOptions(families=("quantization",)))
    assert set(space.groups) == {"quantization"} and "distillation" not in space.ranges
    params = sample(space)
    assert params[COMBINATION] == "quantization"
    assert all(n.startswith(("bits.", "quantization.")) for n in params if n != COMBINATION)
    assert set(space.policy(params).techniques()) <= {"quantization"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"colour": 1}, "unknown search-space key"),
        ({"families": ["magic"]}, "families\\[0\\]: unknown technique"),
        ({"grouping": "random"}, "grouping: one of"),
        ({"choices": {"bits": []}}, "non-empty list"),
        ({"choices": {"bits": [1, 4]}}, "choices.bits"),
        ({"choices": {"sparsity": [0.5, 1.5]}}, "choices.sparsity"),
        ({"distillation": {"heat": [1]}}, "distillation.heat"),
        ({"families": ["distillation"]}, "no layer of the model can be compressed"),
    ],
)
def test_bad_space_overrides_are_clear_errors(overrides, message):
    with pytest.raises(SpaceError, match=message):
        build_space(DigitsCNN(), options_from_json(overrides))


def test_space_file(tmp_path):
    (tmp_path / "space.json").write_text(json.dumps({"families": ["quantization"], "choices": {"bits": [4, 8]}}))
    space = build_space(DigitsCNN(), load_space_file(tmp_path / "space.json"))
    assert space.choices["bits"] == (4, 8) and list(space.groups) == ["quantization"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SpaceError, match="not valid JSON"):
        load_space_file(tmp_path / "bad.json")
    with pytest.raises(SpaceError, match="cannot read"):
        load_space_file(tmp_path / "absent.json")


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"groups": {"g": "re:conv["}}, r"groups\.g: bad regular expression"),
        ({"choices": [1, 2]}, "choices: expected an object, got list"),
        ({"exclude": ["conv1"]}, "exclude: expected an object, got list"),
        ({"families": 5}, "families: expected a list, got int"),
        ({"groups": {"g": 5}}, r"groups\.g: expected a layer name or re: pattern, got 5"),
        ({"distillation": {"epochs": [-1]}}, r"distillation\.epochs\[0\]: .*epochs"),
        ({"distillation": {"temperature": ["hot"]}}, r"distillation\.temperature\[0\]: .*temperature"),
        ({"distillation": {"temperature": [8.0, 1.0]}}, r"distillation\.temperature: expected \[low, high\]"),
        ({"distillation": {"lr": [0, 1e-3]}}, r"distillation\.lr"),
        ({"choices": {"bits": [4, 8.0]}}, r"choices\.bits\[1\]: .*bits"),
        ({"families": ["quantization", 3]}, r"families\[1\]: unknown technique 3"),
        ({"grouping": 7}, "grouping: one of"),
    ],
)
def test_every_field_of_a_space_file_is_checked_and_named(doc, message):
    with pytest.raises(SpaceError, match=message):
        options_from_json(doc)


def test_a_group_that_matches_no_layer_is_refused():
    with pytest.raises(SpaceError, match=r"groups\.heads: matches no layer"):
        build_space(DigitsCNN(), options_from_json({"groups": {"convs": "re:conv.*", "heads": "re:attention.*"}}))


@pytest.mark.parametrize(
    "content, message",
    [(b"\xff\xfe\x00binary", "not UTF-8 text"), (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")],
)
def test_unreadable_space_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "space.json"
    path.write_bytes(content)
    with pytest.raises(SpaceError, match=message):
        load_space_file(path)


# --------------------------------------------------------------------------- global ranges and their sources

DISTILL = techniques.get("distillation")
DECLARED = {g.setting: g.bounds if g.bounds is not None else g.choices for g in DISTILL.search.globals}
STEPS_DECLARED = "steps" in DECLARED


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(num_hidden_layers=12, hidden_size=32)


def test_a_transformer_gets_fine_tuning_defaults_and_a_cnn_keeps_the_declared_ones(bert):
    assert model_ranges(TinyCNN()) == {} and model_ranges(DigitsCNN()) == {}
    derived = model_ranges(bert)
    # distillation declares them: a small learning rate, a step budget with epochs 0 meaning "until it is spent"
    assert derived == {"distill.lr": (1e-5, 1e-4), "distill.steps": (100, 200, 400), "distill.epochs": (0,)}
    space = build_space(bert, SpaceOptions(families=("quantization", "distillation")))
    assert {k: tuple(v) for k, v in space.ranges["distillation"].items()} == {**DECLARED, **{
        key.partition(".")[2]: value for key, value in derived.items()
    }}  # fmt: skip
    assert space.describe()["sources"]["distillation"]["lr"] == "model"
    cnn = build_space(TinyCNN())
    assert {k: tuple(v) for k, v in cnn.ranges["distillation"].items()} == DECLARED
    assert set(cnn.describe()["sources"]["distillation"].values()) == {"technique"}
    assert cnn.max_epochs() == max(DECLARED["epochs"])


@pytest.fixture
def redeclared_distillation():
    """Distillation registered again with other attention defaults (restored afterwards)."""
    search = dataclasses.replace(DISTILL.search, attention_ranges=({"lr": (2e-5, 3e-5)}, {"alpha": (0.5, 0.6)}))
    techniques.unregister(DISTILL.name)
    techniques.register(dataclasses.replace(DISTILL, search=search))
    yield
    techniques.unregister(DISTILL.name)
    techniques.register(DISTILL)


def test_the_model_defaults_are_what_the_technique_declares(bert, redeclared_distillation):
    assert model_ranges(bert) == {"distill.lr": (2e-5, 3e-5), "distill.alpha": (0.5, 0.6)}
    assert model_ranges(TinyCNN()) == {}


def test_derived_ranges_make_valid_policies_and_a_step_budget_has_no_epoch_bound(bert):
    space = build_space(bert, SpaceOptions(families=("quantization", "distillation")))
    for seed in range(3):
        policy = space.policy(sample(space, seed))
        fine_tune = policy.steps[-1]
        assert fine_tune.technique == "distillation" and 1e-5 <= fine_tune.lr <= 1e-4
    if STEPS_DECLARED:
        assert space.max_epochs() is None  # epochs 0: no epoch bound for ASHA
        reference = dict((name, params) for name, _, params in space.fixed_points()[1:])["uniform int8"]
        assert reference["distill.steps"] == 400 and reference["distill.epochs"] == 0


def test_precedence_options_over_workload_over_model_over_technique(bert):
    options = options_from_json({"families": ["quantization", "distillation"], "distillation": {"lr": [1e-4, 1e-3]}})
    workload = {"distill.lr": (2e-5, 5e-5), "distill.temperature": [2.0, 4.0]}
    space = build_space(bert, options, defaults=workload)
    ranges, sources = space.ranges["distillation"], space.describe()["sources"]["distillation"]
    assert ranges["lr"] == (1e-4, 1e-3) and sources["lr"] == "options"  # the file beats the workload
    assert ranges["temperature"] == (2.0, 4.0) and sources["temperature"] == "workload"
    assert ranges["alpha"] == DECLARED["alpha"] and sources["alpha"] == "technique"
    if STEPS_DECLARED:
        assert ranges["steps"] == (100, 200, 400) and sources["steps"] == "model"
    without_file = build_space(bert, SpaceOptions(families=("quantization", "distillation")), defaults=workload)
    assert without_file.ranges["distillation"]["lr"] == (2e-5, 5e-5)  # the workload beats the model
    on_a_cnn = build_space(TinyCNN(), defaults={"distill.epochs": [1, 2]})
    assert on_a_cnn.ranges["distillation"]["epochs"] == (1, 2) and on_a_cnn.max_epochs() == 2


@pytest.mark.skipif(not STEPS_DECLARED, reason="distillation declares no `steps` to budget")
def test_a_derived_bundle_is_dropped_whole_when_the_user_sets_part_of_it(bert):
    space = build_space(bert, options_from_json({"distillation": {"epochs": [1, 2]}}))
    ranges, sources = space.ranges["distillation"], space.describe()["sources"]["distillation"]
    assert ranges["epochs"] == (1, 2) and ranges["steps"] == DECLARED["steps"] and sources["steps"] == "technique"
    assert ranges["lr"] == (1e-5, 1e-4)  # the learning-rate bundle still applies
    assert space.max_epochs() == 2
    steps_only = build_space(bert, defaults={"distill.steps": [50]})
    assert steps_only.ranges["distillation"]["steps"] == (50,)
    assert steps_only.ranges["distillation"]["epochs"] == DECLARED["epochs"]  # no epochs 0 without the bundle


@pytest.mark.parametrize(
    "workload, message",
    [
        ({"distill.heat": [1.0, 2.0]}, r"search_ranges\.distill\.heat: unknown global setting"),
        ({"bits.fc1": [8]}, r"search_ranges\.bits\.fc1: unknown global setting"),
        ({"distill.lr": [0.0, 1e-3]}, r"search_ranges\.distill\.lr"),
        ({"distill.temperature": (8.0, 1.0)}, r"search_ranges\.distill\.temperature: expected \[low, high\]"),
        ({"distill.epochs": 3}, r"search_ranges\.distill\.epochs: expected a list"),
    ],
)
def test_bad_workload_ranges_are_clear_errors(workload, message):
    with pytest.raises(SpaceError, match=message):
        build_space(TinyCNN(), defaults=workload)


@pytest.mark.skipif(not STEPS_DECLARED, reason="distillation declares no `steps` to budget")
def test_ranges_valid_alone_that_clash_together_are_refused_before_the_search():
    with pytest.raises(SpaceError, match=r"distillation: the ranges searched \(epochs from options, steps from "):
        build_space(TinyCNN(), options_from_json({"distillation": {"epochs": [0, 2], "steps": [100, 0]}}))
    fine = build_space(TinyCNN(), options_from_json({"distillation": {"epochs": [0], "steps": [100]}}))
    assert fine.max_epochs() is None


def test_removed_values_are_never_proposed_and_references_leave_those_groups_alone():
    space = build_space(DigitsCNN(), options_from_json({"families": ["quantization", "unstructured_pruning"]}))
    removed = {"bits.fc2": (2, 3, 4), "sparsity.conv1": (0.5, 0.7, 0.8, 0.9, 0.95)}  # conv1: only "off" is left
    refined = space.refined(removed, [("seed", {"quantization": {"fc1": 4}})])
    assert refined.group_choices("bits", "fc2") == tuple(v for v in space.choices["bits"] if v not in (2, 3, 4))
    for seed in range(30):
        params = sample(refined, seed)
        assert params.get("bits.fc2") not in (2, 3, 4) and params.get("sparsity.conv1", 0.0) == 0.0
    points = {name: params for name, _, params in refined.fixed_points()}
    assert points["uniform 4-bit, 1 group left alone"]["bits.fc2"] == 32  # the off value
    assert points["uniform int8"]["bits.fc2"] == 8
    assert points["seed"]["bits.fc1"] == 4 and points["seed"]["bits.conv1"] == 32
    assert refined.describe()["removed"] == {k: list(v) for k, v in removed.items()}
    # a family whose every group is left only "off" is not offered: it would compress nothing
    off = {f"sparsity.{g}": space.choices["sparsity"][1:] for g in space.groups["unstructured_pruning"]}
    assert refined.refined(off, ()).combinations() == ["quantization"]


def test_a_one_step_policy_sets_one_group_and_does_not_fine_tune():
    space = build_space(DigitsCNN(), options_from_json({"grouping": "type"}))
    policy = space.one_step_policy("quantization", "Linear", 4)
    assert [step.technique for step in policy.steps] == ["quantization"]
    assert policy.steps[0].bits.as_dict() == {"fc1": 4, "fc2": 4}
    validate_for_model(policy, DigitsCNN())


def test_a_space_whose_families_offer_only_their_off_value_is_refused_in_one_line():
    """bits [32] alone (float everywhere) left no family to offer: Optuna then failed on an empty choice list."""
    with pytest.raises(SpaceError, match=r"nothing to search: every family offers only its off value \(bits \[32\]"):
        build_space(DigitsCNN(), options_from_json({"families": ["quantization"], "choices": {"bits": [32]}}))
    space = build_space(DigitsCNN(), options_from_json({"families": ["quantization"], "choices": {"bits": [4, 32]}}))
    every_group = {f"bits.{group}": (4,) for group in space.groups["quantization"]}
    with pytest.raises(SpaceError, match="less the values removed"):
        space.refined(every_group, ())

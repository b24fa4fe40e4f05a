"""A new technique is one module: registering it is enough for the search space, policies and the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import optuna
import pytest
import torch
from torch import nn

import techniques
from orchestrator.policy import Policy, validate_for_model
from orchestrator.report._policy import layer_settings, layer_table
from orchestrator.search.space import COMBINATION, build_space
from orchestrator.search.space_options import options_from_json
from orchestrator.workloads.digits import DigitsCNN

NAME = "weight_rounding"


@dataclass(frozen=True)
class RoundingSpec(techniques.TechniqueSpec):
    """Round each layer's weights to a multiple of `step` (0 leaves the layer alone)."""

    technique: ClassVar[str] = NAME
    step: techniques.LayerMap = techniques.LayerMap()

    def validate(self) -> None:
        for layer, value in self.step.entries:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise techniques.SpecError(f"{NAME}: step for {layer!r} must be in [0, 1], got {value!r}")


def round_weights(model: nn.Module, spec: RoundingSpec, ctx: techniques.Context) -> nn.Module:
    for _, module, step in techniques.resolve_layers(model, spec.step, (nn.Linear,), NAME):
        if step > 0:
            with torch.no_grad():
                module.weight.copy_(torch.round(module.weight / step) * step)
    return model


def only_wide(layers):  # noqa: ANN001, ANN201
    return [name for name, m in layers if m.in_features >= 64]


@pytest.fixture
def rounding():
    technique = techniques.register(
        techniques.Technique(
            name=NAME,
            spec_type=RoundingSpec,
            apply=round_weights,
            layer_types=(nn.Linear,),
            stage=35,
            search=techniques.SearchSettings(
                per_layer=techniques.LayerSearch(
                    setting="step", choices=(0.0, 0.01, 0.1), off=0.0, title="rounding step", eligible=only_wide
                )
            ),
        )
    )
    yield technique
    techniques.unregister(NAME)


def test_a_registered_technique_joins_the_space_policies_and_report(rounding):
    model = DigitsCNN()
    space = build_space(model)
    assert space.groups[NAME] == {"fc1": ("fc1",), "fc2": ("fc2",)}  # Linear layers it declared eligible
    assert "step.fc1" in space.parameter_names() and space.choices["step"] == (0.0, 0.01, 0.1)
    assert any(NAME in combination.split("+") for combination in space.combinations())

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({COMBINATION: f"{NAME}+quantization", "step.fc1": 0.1, "step.fc2": 0.0})
    trial = study.ask()
    space.define(trial)
    policy = space.policy(trial.params)
    assert policy.techniques()[:2] == [NAME, "quantization"]  # canonical order from its stage
    assert policy.steps[0].step.as_dict() == {"fc1": 0.1}  # the off value stays out of the policy
    validate_for_model(policy, model)
    assert Policy.loads(policy.dumps()) == policy

    rounded = round_weights(DigitsCNN(), policy.steps[0], techniques.Context(example_inputs=torch.zeros(1, 1, 8, 8)))
    assert torch.allclose(rounded.fc1.weight, torch.round(rounded.fc1.weight * 10) / 10)

    assert layer_settings()["rounding step"] == (NAME, "step")
    table = layer_table("rounding step", [policy.dumps()])
    assert table.columns == ["fc1"] and table.values == [[0.1]]


def test_a_search_space_file_may_set_its_choices(rounding):
    options = options_from_json({"families": [NAME], "choices": {"step": [0.0, 0.5]}})
    space = build_space(DigitsCNN(), options)
    assert list(space.groups) == [NAME] and space.choices == {"step": (0.0, 0.5)}
    with pytest.raises(techniques.SpecError, match="step"):
        RoundingSpec(step=2.0)


def test_without_it_nothing_mentions_it():
    assert NAME not in techniques.registry()
    assert NAME not in build_space(DigitsCNN()).groups
    assert "rounding step" not in layer_settings()

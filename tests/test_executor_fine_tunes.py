"""The executor finds the fine-tuning step by the technique's `fine_tunes` declaration, not by its name: a technique
registered with `fine_tunes=True` has its epochs reported with the preview of the final model's artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import techniques
from orchestrator import executor
from orchestrator.api import workload_from
from orchestrator.policy import Policy

NAME = "test_epoch_reporter"


@dataclass(frozen=True)
class ReporterSpec(techniques.TechniqueSpec):
    """Reports `epochs` made-up epochs through the context when it is asked to (changes no weight)."""

    technique: ClassVar[str] = NAME
    epochs: int = 2


def report_epochs(model: nn.Module, spec: ReporterSpec, ctx: techniques.Context) -> nn.Module:
    if ctx.on_epoch is not None:
        for epoch in range(1, spec.epochs + 1):
            ctx.on_epoch(epoch, 0.5)
    return model


@pytest.fixture(params=[True, False], ids=["fine-tunes", "does-not"])
def reporter(request):
    technique = techniques.register(
        techniques.Technique(
            name=NAME,
            spec_type=ReporterSpec,
            apply=report_epochs,
            layer_types=(),
            stage=55,
            fine_tunes=request.param,
        )
    )
    yield technique
    techniques.unregister(NAME)


@pytest.fixture(scope="module")
def tiny_workload():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    return workload_from(
        model=nn.Sequential(nn.Linear(6, 3)), train=(x, x[:, :3].argmax(1)), validation=(x, x[:, :3].argmax(1))
    )


def test_the_step_of_a_technique_that_fine_tunes_reports_its_epochs(reporter, tiny_workload):
    reported = []
    result = executor.apply(
        Policy((ReporterSpec(epochs=2),)),
        tiny_workload,
        on_epoch=lambda epoch, value, artifact: reported.append((epoch, value, artifact)),
    )
    if not reporter.fine_tunes:
        assert reported == []  # not the fine-tuning step: no epoch hook, whatever the step does
        return
    assert [(epoch, value) for epoch, value, _ in reported] == [(1, 0.5), (2, 0.5)]
    artifact = reported[0][2]
    assert artifact["size_bytes"] == result.metrics["size_bytes"]  # the preview is of the artifact it ships

"""The search settings have one source: the config's dataclasses hold every default, and the command line and the
Python API read them from there (issue #23)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from orchestrator import api
from orchestrator.cli import build_parser
from orchestrator.cli._search import NOT_FLAGS, config_from_args
from orchestrator.errors import UserError
from orchestrator.search.config import (
    DEFAULTS,
    SETTING_PARTS,
    MeasureSettings,
    Resources,
    RunSettings,
    SearchConfig,
    SearchStrategy,
)
from orchestrator.search.space_options import SpaceOptions

PARTS = {"strategy": SearchStrategy, "resources": Resources, "run": RunSettings, "measure": MeasureSettings}


def field_default(field: dataclasses.Field) -> object:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def dataclass_defaults() -> dict[str, object]:
    """Every flat setting's default, read from the dataclasses' fields themselves (not through DEFAULTS)."""
    own = {f.name: field_default(f) for f in dataclasses.fields(SearchConfig) if f.name not in PARTS}
    return own | {f.name: field_default(f) for part in PARTS.values() for f in dataclasses.fields(part)}


def search_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["search"]


def cli_config(*flags: str) -> SearchConfig:
    return config_from_args(build_parser().parse_args(["search", *flags]))


def test_the_config_is_the_workload_and_four_parts_each_setting_in_one():
    assert {f.name for f in dataclasses.fields(SearchConfig)} == {"workload", "data_dir", "weights", *PARTS}
    assert DEFAULTS == dataclass_defaults()
    for name, part in SETTING_PARTS.items():
        assert part == "" or name in {f.name for f in dataclasses.fields(PARTS[part])}


def test_the_command_line_defaults_are_the_dataclass_defaults():
    defaults = {a.dest: a.default for a in search_parser()._actions}
    flagged = {name: value for name, value in dataclass_defaults().items() if name not in NOT_FLAGS}
    assert {name: defaults[name] for name in flagged} == flagged
    assert dataclass_defaults()["max_accuracy_drop"] == 0.05 and dataclass_defaults()["num_trials"] is None


def test_help_shows_the_dataclass_defaults():
    parser = search_parser()
    formatter = parser.formatter_class(parser.prog)
    shown = {a.dest: formatter._get_help_string(a) % {"default": a.default} for a in parser._actions if a.help}
    for name in ("max_accuracy_drop", "sampler", "seed", "cpus_per_trial", "storage_path", "target"):
        assert shown[name].endswith(f"(default: {DEFAULTS[name]})"), shown[name]
    assert shown["objectives"].endswith(f"(default: {','.join(DEFAULTS['objectives'])})")


def test_compress_and_the_command_line_build_the_same_config(monkeypatch):
    seen: list[SearchConfig] = []
    monkeypatch.setattr(api, "run_search", seen.append)
    api.compress(workload="digits")
    assert seen == [cli_config()]
    api.compress(workload="digits", num_trials=7, max_accuracy_drop=None, families=("quantization",), seed=3)
    flags = ["--num-trials", "7", "--max-accuracy-drop", "none", "--families", "quantization", "--seed", "3"]
    assert seen[-1] == cli_config(*flags)


def test_compress_declares_the_dataclass_defaults():
    parameters = inspect.signature(api.compress).parameters
    settings = {name: p.default for name, p in parameters.items() if name in DEFAULTS and name != "workload"}
    assert settings == {name: DEFAULTS[name] for name in settings} and len(settings) >= 9
    assert parameters["families"].default == SpaceOptions().families


def test_flat_settings_are_routed_into_their_parts_and_refine_a_given_part():
    config = SearchConfig(workload="text", num_trials=8, cpus_per_trial=2, storage_path="out", target="onnxruntime")
    assert config.workload == "text" and config.strategy.num_trials == 8 and config.resources.cpus_per_trial == 2
    assert (config.run.storage_path, config.measure.target) == ("out", "onnxruntime")
    refined = SearchConfig(strategy=SearchStrategy(sampler="nsga2", seed=5), seed=6)
    assert (refined.strategy.sampler, refined.strategy.seed) == ("nsga2", 6)
    resumed = dataclasses.replace(config, num_trials=12, resume=True)
    assert (resumed.strategy.num_trials, resumed.run.resume, resumed.resources) == (12, True, config.resources)
    assert SearchConfig() == SearchConfig(strategy=SearchStrategy(), run=RunSettings())


def test_an_unknown_setting_names_the_known_ones():
    with pytest.raises(TypeError, match="no setting num_trial; known: workload, .*num_trials"):
        SearchConfig(num_trial=3)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"objectives": ("size",)}, "must include accuracy"),
        ({"sampler": "grid"}, "unknown sampler"),
        ({"cpus_per_trial": 0}, "--cpus-per-trial"),
        ({"concurrency": 0}, "--concurrency"),
        ({"latency_batch_size": 0}, "--latency-batch-size"),
        ({"target": "tensorrt"}, "tensorrt"),
    ],
)
def test_each_part_checks_its_own_values(settings, message):
    with pytest.raises(UserError, match=message):
        SearchConfig(**settings).check()

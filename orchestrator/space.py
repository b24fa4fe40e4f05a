"""The search space: per-layer (or per-group) settings of each technique family, plus distillation globals.

Built once from the baseline model (which layers each family can act on, how they are grouped); after
that, `define(trial)` — the define-by-run function Optuna calls — is pure and fast, and `policy(params)`
turns a trial's parameters into a Policy. `families` picks which families compress (a non-empty
combination such as `lowrank+quantization`, so the sampler never spends a trial on the uncompressed
model); then `SETTING.GROUP` (e.g. `bits.fc1`) per group of each family picked, and `distill.temperature`,
`distill.alpha`, `distill.epochs`, `distill.lr`. The baseline is the point `{"families": "none"}`, run by
the driver outside the sampler.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import techniques
from orchestrator.errors import UserError
from orchestrator.policy import Policy

FAMILIES = ("lowrank", "structured_pruning", "unstructured_pruning", "quantization", "distillation")
SETTING = {"lowrank": "rank", "structured_pruning": "ratio", "unstructured_pruning": "sparsity", "quantization": "bits"}
OFF = {"rank": "none", "ratio": 0.0, "sparsity": 0.0, "bits": 32}  # the value meaning "leave the layer alone"
DEFAULT_CHOICES: dict[str, tuple[Any, ...]] = {
    "rank": ("none", 0.5, 0.35, 0.25),  # fraction of a layer's parameters kept by factorisation
    "ratio": (0.0, 0.125, 0.25, 0.375, 0.5),  # fraction of output channels removed
    "sparsity": (0.0, 0.5, 0.7, 0.8, 0.9, 0.95),  # fraction of weights zeroed
    "bits": (2, 3, 4, 5, 6, 8, 32),  # weight bit-width; 32 keeps fp32
}
DEFAULT_DISTILL = {"temperature": (1.0, 8.0), "alpha": (0.1, 0.95), "epochs": (2, 4, 8), "lr": (3e-4, 3e-3)}
COMBINATION = "families"  # the parameter naming the families a trial uses, joined by "+"
NONE = "none"  # its value for the uncompressed baseline (never offered to the sampler)
GROUPINGS = ("auto", "layer", "block", "type")
_SPACE_FILE_KEYS = {"families", "grouping", "groups", "choices", "distillation", "exclude"}


class SpaceError(UserError):
    """A search-space option or file is invalid."""


@dataclass(frozen=True)
class SearchSpace:
    """Which layers each family searches (as named groups) and the values each setting may take."""

    groups: Mapping[str, Mapping[str, tuple[str, ...]]]  # family → group → layer names
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=lambda: dict(DEFAULT_CHOICES))
    distill: Mapping[str, tuple[Any, ...]] | None = field(default_factory=lambda: dict(DEFAULT_DISTILL))
    seed: int = 0

    def combinations(self) -> list[str]:
        """Every non-empty combination of the searched families, as `COMBINATION` values."""
        searched = [f for f in FAMILIES if self.groups.get(f)]
        subsets = itertools.chain.from_iterable(
            itertools.combinations(searched, k) for k in range(1, len(searched) + 1)
        )
        return ["+".join(subset) for subset in subsets]

    def define(self, trial: Any) -> None:
        """Optuna's define-by-run function (no model is built): which families, then one setting per layer
        group of each family picked; the distillation globals always."""
        used = set(trial.suggest_categorical(COMBINATION, self.combinations()).split("+"))
        for family, groups in self.groups.items():
            if family not in used:
                continue
            setting = SETTING[family]
            for group in groups:
                trial.suggest_categorical(f"{setting}.{group}", list(self.choices[setting]))
        if self.distill is not None:
            trial.suggest_float("distill.temperature", *self.distill["temperature"])
            trial.suggest_float("distill.alpha", *self.distill["alpha"])
            trial.suggest_categorical("distill.epochs", list(self.distill["epochs"]))
            trial.suggest_float("distill.lr", *self.distill["lr"], log=True)

    def policy(self, params: Mapping[str, Any]) -> Policy:
        """The policy a trial's parameters describe (steps whose layers are all "off" are left out)."""
        used = set(str(params.get(COMBINATION, NONE)).split("+"))
        steps = []
        for family in FAMILIES[:-1]:
            setting = SETTING[family]
            if family not in used:
                continue
            values = {
                layer: params[f"{setting}.{group}"]
                for group, layers in self.groups.get(family, {}).items()
                for layer in layers
                if params[f"{setting}.{group}"] != OFF[setting]
            }
            if values:
                steps.append(techniques.get(family).spec_type(**{setting: values}))
        if steps and self.distill is not None:
            steps.append(
                techniques.get("distillation").spec_type(
                    temperature=params["distill.temperature"],
                    alpha=params["distill.alpha"],
                    epochs=params["distill.epochs"],
                    lr=params["distill.lr"],
                )
            )
        return Policy(tuple(steps), seed=self.seed)

    def parameter_names(self) -> list[str]:
        """Every parameter the space can suggest (per-layer ones only when their family is picked)."""
        names = [COMBINATION]
        names += [f"{SETTING[f]}.{g}" for f, groups in self.groups.items() for g in groups]
        if self.distill is not None:
            names += ["distill.temperature", "distill.alpha", "distill.epochs", "distill.lr"]
        return names

    def fixed_points(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, role, params) evaluated before the sampler starts: the baseline (first; the driver runs it
        outside the sampler) and uniform references."""
        references = [("baseline", "baseline", {})]
        uniform = [("uniform int8", {"bits": 8}), ("uniform 4-bit", {"bits": 4})]
        uniform.append(("50% sparse + int8", {"sparsity": 0.5, "bits": 8}))
        for name, settings in uniform:
            if all(v in self.choices[s] and self._searches(s) for s, v in settings.items()):
                references.append((name, "reference", settings))
        return [(name, role, self._point(settings)) for name, role, settings in references]

    def _searches(self, setting: str) -> bool:
        return any(SETTING[f] == setting and groups for f, groups in self.groups.items())

    def _point(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        used = [f for f, groups in self.groups.items() if groups and SETTING[f] in settings]
        if not used:
            return {COMBINATION: NONE}
        point: dict[str, Any] = {COMBINATION: "+".join(f for f in FAMILIES if f in used)}
        for family in used:
            point.update({f"{SETTING[family]}.{group}": settings[SETTING[family]] for group in self.groups[family]})
        if self.distill is not None:
            low_t, high_t = self.distill["temperature"]
            low_a, high_a = self.distill["alpha"]
            low_lr, high_lr = self.distill["lr"]
            point["distill.temperature"] = min(max(4.0, low_t), high_t)
            point["distill.alpha"] = min(max(0.7, low_a), high_a)
            point["distill.epochs"] = max(self.distill["epochs"])
            point["distill.lr"] = min(max(1e-3, low_lr), high_lr)
        return point

    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary (for run metadata and reports)."""
        return {
            "groups": {f: {g: list(layers) for g, layers in groups.items()} for f, groups in self.groups.items()},
            "choices": {k: list(v) for k, v in self.choices.items()},
            "distill": None if self.distill is None else {k: list(v) for k, v in self.distill.items()},
            "dimensions": len(self.parameter_names()),
        }


def _eligible(model: nn.Module, family: str) -> list[str]:
    """Layers a family can usefully act on (factorising tiny layers or pruning the output layer cannot help)."""
    layers = list(techniques.layers_of(model, (nn.Linear, nn.Conv2d)))
    if family == "structured_pruning":
        layers = layers[:-1]  # the last layer produces the model's output; its features must stay
    if family == "lowrank":
        layers = [
            (n, m)
            for n, m in layers
            if (isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= 8)
            or (isinstance(m, nn.Conv2d) and m.groups == 1 and min(m.in_channels, m.out_channels) >= 8)
        ]
    return [name for name, _ in layers]


def _group(layers: Sequence[str], model: nn.Module, grouping: str, regex_groups: Mapping[str, str]) -> dict:
    if regex_groups:
        groups: dict[str, list[str]] = {}
        for layer in layers:
            for group, pattern in regex_groups.items():
                if re.fullmatch(pattern.removeprefix("re:"), layer):
                    groups.setdefault(group, []).append(layer)
                    break
        return {g: tuple(v) for g, v in groups.items()}
    if grouping == "auto":
        grouping = "layer" if len(layers) <= 12 else "block"
    modules = dict(model.named_modules())
    key = {
        "layer": lambda name: name,
        "block": lambda name: name.split(".")[0],
        "type": lambda name: techniques.base_type(modules[name]).__name__,
    }[grouping]
    grouped: dict[str, list[str]] = {}
    for layer in layers:
        grouped.setdefault(key(layer), []).append(layer)
    return {g: tuple(v) for g, v in grouped.items()}


def build_space(
    model: nn.Module,
    *,
    families: Sequence[str] = FAMILIES,
    grouping: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> SearchSpace:
    """The space for `model`; `overrides` is a parsed search-space file (see README)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - _SPACE_FILE_KEYS)
    if unknown:
        raise SpaceError(
            f"unknown search-space key(s) {', '.join(unknown)}; known: {', '.join(sorted(_SPACE_FILE_KEYS))}"
        )
    families = tuple(overrides.get("families", families))
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise SpaceError(
            f"unknown technique famil(ies) {', '.join(bad) or '(none given)'}; known: {', '.join(FAMILIES)}"
        )
    grouping = overrides.get("grouping", grouping)
    if grouping not in GROUPINGS:
        raise SpaceError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    choices = dict(DEFAULT_CHOICES)
    for setting, values in overrides.get("choices", {}).items():
        if setting not in choices or not isinstance(values, list) or not values:
            raise SpaceError(f"choices.{setting}: expected a non-empty list for one of {', '.join(choices)}")
        choices[setting] = tuple(values)
    distill = dict(DEFAULT_DISTILL)
    for key, values in overrides.get("distillation", {}).items():
        if key not in distill or not isinstance(values, list) or not values:
            raise SpaceError(f"distillation.{key}: expected a list for one of {', '.join(distill)}")
        distill[key] = tuple(values)
    excluded = overrides.get("exclude", {})
    groups = {}
    for family in families:
        if family == "distillation":
            continue
        layers = [
            name
            for name in _eligible(model, family)
            if not any(re.fullmatch(p.removeprefix("re:"), name) for p in excluded.get(family, []))
        ]
        if layers:
            groups[family] = _group(layers, model, grouping, overrides.get("groups", {}))
    if not groups:
        raise SpaceError(f"no layer of the model can be compressed by {', '.join(families)}")
    _check_choices(choices)
    return SearchSpace(groups, choices, distill if "distillation" in families else None, seed)


def _check_choices(choices: Mapping[str, tuple[Any, ...]]) -> None:
    """Every choice must be a value its technique accepts (or the "off" value)."""
    for family, setting in SETTING.items():
        spec_type = techniques.get(family).spec_type
        for value in choices[setting]:
            if value == OFF[setting]:
                continue
            try:
                spec_type(**{setting: value})
            except techniques.SpecError as exc:
                raise SpaceError(f"choices.{setting}: {exc}") from None


def load_space_file(path: str | Path) -> dict[str, Any]:
    """Parse a search-space JSON file (validated by `build_space`)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SpaceError(f"cannot read search-space file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SpaceError(f"search-space file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"search-space file {path} must hold a JSON object")
    return doc

"""The search space, built from the technique registry: every setting's values come from the technique.

Built once from the baseline model (which layers each technique can act on, how they are grouped); after
that, `define(trial)` — the define-by-run function Optuna calls — is pure and fast, and `policy(params)`
turns a trial's parameters into a Policy. `families` picks which compressing techniques a trial combines
(a non-empty combination such as `lowrank+quantization`, so the sampler never spends a trial on the
uncompressed model; parameters that still compress nothing, every group "off", fail `compresses` and the
searcher samples again); then `SETTING.GROUP` (e.g. `bits.fc1`, `bits.query.early`) per layer group of each
technique picked (groups: `grouping.py`), and the global settings of the fine-tuning technique
(`distill.temperature`, …). The baseline is the point `{"families": "none"}`, run by the driver outside the
sampler.

Global settings' ranges, per setting, first found of: the user's options (search-space file, flags), the
workload's `search_ranges` (`build_space(defaults=...)`), defaults that suit the model (`model_ranges`: the
techniques' `attention_ranges` for a model with attention, e.g. distillation's lr 1e-5…1e-4 for 100/200/400
optimiser steps, `epochs` 0), and the technique's declaration. `describe()["sources"]` says which one each range
came from.

A family is a technique with a per-layer setting, or one with only global settings that does not fine-tune
(`student`: a lighter architecture, one `student.width` parameter). The student family is offered only when
the workload can build students (`build_space(build_student=...)`); the space builds each searched width's
student once and keeps its layer names, so per-layer settings of a policy with a student address only layers
the student has (a shallower student drops the teacher's deeper layers).

Decisions: a technique declares its settings (`techniques.SearchSettings`) and this module reads them, so
a new technique appears here without touching this file; the options a user gives (flags and a
search-space file) arrive as one typed `SpaceOptions` (see `space_options.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import techniques
from orchestrator.policy import Policy
from orchestrator.search.grouping import AUTO_LAYER_LIMIT, group_layers, has_attention
from orchestrator.search.space_options import (
    GROUPINGS,
    SpaceError,
    SpaceOptions,
    flat_ranges,
    global_setting,
    per_layer_of,
    searchable,
    settings_of,
)
from techniques.student import NAME as STUDENT

COMBINATION = "families"  # the parameter naming the techniques a trial combines, joined by "+"
NONE = "none"  # its value for the uncompressed baseline (never offered to the sampler)
MAX_CHECKED = 4096  # combinations of global settings checked for validity when the space is built
# Reference policies evaluated before the sampler starts: per-layer setting → the value every layer gets.
REFERENCES: tuple[tuple[str, Mapping[str, Any]], ...] = (
    ("uniform int8", {"bits": 8}),
    ("uniform 4-bit", {"bits": 4}),
    ("50% sparse + int8", {"sparsity": 0.5, "bits": 8}),
)

__all__ = [
    "AUTO_LAYER_LIMIT",
    "COMBINATION",
    "GROUPINGS",
    "NONE",
    "SearchSpace",
    "SpaceError",
    "SpaceOptions",
    "build_space",
    "global_ranges",
    "model_ranges",
]


STUDENT_WIDTH = f"{STUDENT}.width"  # the parameter holding a student's width


def _global_name(technique: techniques.Technique, setting: str) -> str:
    return f"{settings_of(technique).prefix or technique.name}.{setting}"


def _compresses(technique: techniques.Technique) -> bool:
    """Whether a technique is a family trials combine: it has a per-layer setting, or it does not fine-tune (a
    whole-model change searched by its global settings, such as a student); distillation joins every policy."""
    return settings_of(technique).per_layer is not None or not technique.fine_tunes


@dataclass(frozen=True)
class SearchSpace:
    """Which layers each compressing technique searches (as named groups) and the values each setting may
    take; `ranges` holds the global settings of the techniques searched (technique → setting → range)."""

    groups: Mapping[str, Mapping[str, tuple[str, ...]]]  # technique → group → layer names
    choices: Mapping[str, tuple[Any, ...]]  # per-layer setting → values
    ranges: Mapping[str, Mapping[str, tuple[Any, ...]]]  # technique → global setting → bounds or choices
    seed: int = 0
    sources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # … → options/workload/model/technique
    student_layers: Mapping[float, frozenset[str]] = field(default_factory=dict)  # width → the student's modules
    # `SETTING.GROUP` → values never proposed for that group (predicted past the accuracy guard: `sensitivity`)
    removed: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # budgeted allocations evaluated after the references: (name, technique → group → value)
    seeds: tuple[tuple[str, Mapping[str, Mapping[str, Any]]], ...] = ()

    def _techniques(self) -> list[techniques.Technique]:
        return [t for name, t in searchable().items() if name in self.groups or name in self.ranges]

    def _offered(self, technique: techniques.Technique) -> bool:
        """Whether a family has something to search: layers for a per-layer setting, or global settings."""
        per_layer = settings_of(technique).per_layer
        if per_layer is not None:  # a group left only its off value compresses nothing
            groups = self.groups.get(technique.name, {})
            return any(v != per_layer.off for g in groups for v in self.group_choices(per_layer.setting, g))
        return _compresses(technique) and technique.name in self.ranges

    def group_choices(self, setting: str, group: str) -> tuple[Any, ...]:
        """The values the per-layer `setting` may take in `group` (the space's choices, less those removed)."""
        removed = self.removed.get(f"{setting}.{group}", ())
        return tuple(v for v in self.choices[setting] if v not in removed)

    def combinations(self) -> list[str]:
        """Every non-empty combination of the compressing techniques searched, as `COMBINATION` values."""
        searched = [t.name for t in self._techniques() if self._offered(t)]
        subsets = itertools.chain.from_iterable(
            itertools.combinations(searched, k) for k in range(1, len(searched) + 1)
        )
        return ["+".join(subset) for subset in subsets]

    def define(self, trial: Any) -> None:
        """Optuna's define-by-run function (no model is built): which techniques, then one setting per layer
        group of each technique picked, then its global settings; a fine-tuning technique's always."""
        used = set(trial.suggest_categorical(COMBINATION, self.combinations()).split("+"))
        for technique in self._techniques():
            if _compresses(technique) and technique.name not in used:
                continue
            per_layer = settings_of(technique).per_layer
            if per_layer is not None:
                for group in self.groups.get(technique.name, {}):
                    choices = list(self.group_choices(per_layer.setting, group))
                    trial.suggest_categorical(f"{per_layer.setting}.{group}", choices)
            for declared in settings_of(technique).globals:
                self._suggest_global(trial, technique, declared)

    def _suggest_global(self, trial: Any, technique: techniques.Technique, declared: techniques.GlobalSearch) -> None:
        values = self.ranges[technique.name][declared.setting]
        name = _global_name(technique, declared.setting)
        if declared.bounds is not None:
            trial.suggest_float(name, *values, log=declared.log)
        else:
            trial.suggest_categorical(name, list(values))

    def policy(self, params: Mapping[str, Any]) -> Policy:
        """The policy a trial's parameters describe (steps whose layers are all "off" are left out; a
        fine-tuning technique joins only a policy that compresses; with a student, per-layer settings only
        for the layers the student has)."""
        used = set(str(params.get(COMBINATION, NONE)).split("+"))
        kept = self.student_layers.get(params.get(STUDENT_WIDTH, 0.0)) if STUDENT in used else None
        steps, fine_tune = [], []
        for technique in self._techniques():
            per_layer = settings_of(technique).per_layer
            if not _compresses(technique):
                fine_tune.append(technique)
                continue
            if technique.name not in used:
                continue
            if per_layer is None:
                steps.append(technique.spec_type(**_globals(technique, params)))
                continue
            values = {
                layer: params[f"{per_layer.setting}.{group}"]
                for group, layers in self.groups.get(technique.name, {}).items()
                for layer in layers
                if params[f"{per_layer.setting}.{group}"] != per_layer.off and (kept is None or layer in kept)
            }
            if values:
                steps.append(technique.spec_type(**{per_layer.setting: values}, **_globals(technique, params)))
        if steps:
            steps += [technique.spec_type(**_globals(technique, params)) for technique in fine_tune]
        return Policy(tuple(steps), seed=self.seed)

    def compresses(self, params: Mapping[str, Any]) -> bool:
        """Whether a trial's parameters change the model: a family picked with every group "off" (or only layers
        a student lacks) makes the baseline again, which the searcher skips instead of running."""
        return bool(self.policy(params).steps)

    def parameter_names(self) -> list[str]:
        """Every parameter the space can suggest (per-layer ones only when their technique is picked)."""
        names = [COMBINATION]
        for technique in self._techniques():
            per_layer = settings_of(technique).per_layer
            if per_layer is not None:
                names += [f"{per_layer.setting}.{g}" for g in self.groups.get(technique.name, {})]
            names += [_global_name(technique, g.setting) for g in settings_of(technique).globals]
        return names

    def max_epochs(self) -> int | None:
        """The most fine-tuning epochs a trial may ask for (None when no fine-tuning is searched, or when a
        trial may fine-tune for a step budget instead, `epochs` 0, so no epoch bound is known)."""
        for technique in self._techniques():
            epochs = self.ranges.get(technique.name, {}).get("epochs") if technique.fine_tunes else None
            if epochs:
                return None if 0 in epochs else int(max(epochs))
        return None

    def searches(self, setting: str) -> bool:
        """Whether some technique with layers to act on searches the per-layer `setting`."""
        return any(per_layer_of(t).setting == setting and self.groups.get(t.name) for t in self._per_layer())

    def fixed_points(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, role, params) evaluated before the sampler starts: the baseline (first; the driver runs it
        outside the sampler), the uniform references whose settings this space offers (a group whose value was
        removed is left alone, said in the name), then the budgeted seeds (`seeds`, role "reference" too)."""
        points = [("baseline", "baseline", {COMBINATION: NONE})]
        for name, settings in REFERENCES:
            if all(v in self.choices.get(s, ()) and self.searches(s) for s, v in settings.items()):
                values = {
                    t.name: {group: settings[per_layer_of(t).setting] for group in self.groups[t.name]}
                    for t in self._per_layer()
                    if per_layer_of(t).setting in settings and self.groups.get(t.name)
                }
                point, left_alone = self._point(values)
                suffix = f", {left_alone} group{'s' if left_alone > 1 else ''} left alone" if left_alone else ""
                points.append((name + suffix, "reference", point))
        points += [(name, "reference", self._point(values)[0]) for name, values in self.seeds]
        return _distinct(points)

    def _per_layer(self) -> list[techniques.Technique]:
        return [t for t in self._techniques() if settings_of(t).per_layer is not None]

    def _point(self, values: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], int]:
        """The parameters of a fixed point giving `values` (technique → group → value; other groups of those
        techniques off), and how many groups were left alone because their value is removed for them."""
        used = [t for t in self._per_layer() if t.name in values and self._offered(t)]
        point: dict[str, Any] = {COMBINATION: "+".join(t.name for t in used)}
        left_alone = 0
        for technique in used:
            per_layer = per_layer_of(technique)
            for group in self.groups[technique.name]:
                value = values[technique.name].get(group, per_layer.off)
                if value not in self.group_choices(per_layer.setting, group):
                    value, left_alone = per_layer.off, left_alone + 1
                point[f"{per_layer.setting}.{group}"] = value
        for technique in self._techniques():
            if not _compresses(technique) or technique in used:
                for declared in settings_of(technique).globals:
                    values_range = self.ranges[technique.name][declared.setting]
                    point[_global_name(technique, declared.setting)] = _reference_value(declared, values_range)
        return point, left_alone

    def one_step_policy(self, technique: str, group: str, value: Any) -> Policy:
        """The policy giving `value` to the layers of `group` alone, with no fine-tuning (what sensitivity
        profiling applies): the space's own path from parameters to a policy, less its fine-tuning steps."""
        point, _ = self._point({technique: {group: value}})
        policy = self.policy(point)
        kept = tuple(step for step in policy.steps if not techniques.get(step.technique).fine_tunes)
        return Policy(kept, seed=self.seed)

    def refined(
        self,
        removed: Mapping[str, tuple[Any, ...]],
        seeds: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]],
    ) -> SearchSpace:
        """This space with values removed per group and budgeted seeds (see `sensitivity`)."""
        return searchable_space(dataclasses.replace(self, removed=dict(removed), seeds=tuple(seeds)))

    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary (for run metadata and reports)."""
        return {
            "groups": {f: {g: list(layers) for g, layers in groups.items()} for f, groups in self.groups.items()},
            "choices": {k: list(v) for k, v in self.choices.items()},
            "ranges": {t: {k: list(v) for k, v in r.items()} for t, r in self.ranges.items()},
            "sources": {t: dict(s) for t, s in self.sources.items()},
            "dimensions": len(self.parameter_names()),
            "removed": {name: list(values) for name, values in self.removed.items()},
            "seeds": {name: {t: dict(v) for t, v in values.items()} for name, values in self.seeds},
        }


def _distinct(points: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """The fixed points less those that compress nothing (every technique of a reference left alone) or repeat an
    earlier point's parameters (a seed that is a reference)."""
    kept: list[tuple[str, str, dict[str, Any]]] = []
    for name, role, params in points:
        if params.get(COMBINATION) and all(params != other for _, _, other in kept):
            kept.append((name, role, params))
    return kept


def _globals(technique: techniques.Technique, params: Mapping[str, Any]) -> dict[str, Any]:
    """A technique's global settings as a trial's parameters give them (a setting the parameters lack, e.g. in a
    run recorded before it was declared, keeps the spec's default)."""
    names = {g.setting: _global_name(technique, g.setting) for g in settings_of(technique).globals}
    return {setting: params[name] for setting, name in names.items() if name in params}


def _reference_value(declared: techniques.GlobalSearch, values: tuple[Any, ...]) -> Any:
    """The declared reference value, clipped into a float range or the nearest choice (ties: the larger; the
    first choice when the choices or the reference are not numbers and none equals it)."""
    if declared.bounds is not None:
        low, high = values
        return min(max(declared.reference, low), high)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (*values, declared.reference))
    if not numbers:  # e.g. a choice of None, or no reference declared: the reference itself, else the first
        return next((v for v in values if v == declared.reference), values[0])
    return min(values, key=lambda c: (abs(c - declared.reference), -c))


def _eligible(model: nn.Module, technique: techniques.Technique, excluded: Sequence[str]) -> list[str]:
    """The layers of the model a technique's search acts on, less the user's exclusions."""
    layers = list(techniques.layers_of(model, technique.layer_types))
    return [
        name
        for name in per_layer_of(technique).eligible_layers(layers)
        if not any(re.fullmatch(p.removeprefix("re:"), name) for p in excluded)
    ]


def build_space(
    model: nn.Module,
    options: SpaceOptions | None = None,
    *,
    seed: int = 0,
    defaults: Mapping[str, Any] | None = None,
    build_student: Callable[[float], nn.Module] | None = None,
) -> SearchSpace:
    """The space for `model` under the user's `options` (all searchable techniques by default).

    `defaults` are the workload's ranges of global settings under flat keys (`Workload.search_ranges`:
    `{"distill.lr": (1e-5, 1e-4), "distill.steps": [100, 200]}`); see `global_ranges` for the precedence.
    `build_student` is the workload's (`Workload.build_student`): without it the student family is not offered.
    """
    options = options or SpaceOptions()
    chosen = _chosen(options, build_student is not None)
    groups, choices = {}, {}
    for technique in chosen:
        per_layer = settings_of(technique).per_layer
        if per_layer is not None:
            choices[per_layer.setting] = options.choices.get(per_layer.setting, per_layer.choices)
            layers = _eligible(model, technique, options.exclude.get(technique.name, ()))
            if layers:
                groups[technique.name] = dict(group_layers(model, layers, options.grouping, options.groups))
    if not any(groups.values()) and not any(settings_of(t).per_layer is None and _compresses(t) for t in chosen):
        raise SpaceError(f"no layer of the model can be compressed by {', '.join(t.name for t in chosen)}")
    _check_groups_match(options, groups)
    ranges, sources = global_ranges(chosen, model, options, defaults or {})
    widths = ranges.get(STUDENT, {}).get("width", ())
    students = _student_layers(build_student, widths) if build_student is not None else {}
    return searchable_space(SearchSpace(groups, choices, ranges, seed, sources, students))


def searchable_space(space: SearchSpace) -> SearchSpace:
    """`space`, when some family has a compressing value to offer; else a SpaceError naming why."""
    if space.combinations():
        return space
    settings = ", ".join(f"{name} {list(values)}" for name, values in space.choices.items())
    raise SpaceError(
        f"nothing to search: every family offers only its off value ({settings or 'no settings'}"
        f"{', less the values removed' if space.removed else ''}); give a value that compresses"
    )


def _student_layers(
    build_student: Callable[[float], nn.Module], widths: Sequence[float]
) -> dict[float, frozenset[str]]:
    """The module names of the student at each width (each built once, its random init drawn from a forked RNG)."""
    layers = {}
    with torch.random.fork_rng(devices=[]):
        for width in widths:
            layers[width] = frozenset(name for name, _ in build_student(width).named_modules())
    return layers


def _chosen(options: SpaceOptions, can_build_student: bool) -> list[techniques.Technique]:
    """The searchable techniques the options pick; the student only when the workload builds students (an error
    when the user asked for it), and only beside the fine-tuning that trains it."""
    known = searchable()
    chosen = [known[name] for name in known if options.families is None or name in options.families]
    if STUDENT not in (t.name for t in chosen):
        return chosen
    if not can_build_student:
        if options.families is not None:
            raise SpaceError(
                f"families: {STUDENT} needs a workload with build_student (a lighter architecture to distil into); "
                "this workload has none"
            )
        return [t for t in chosen if t.name != STUDENT]
    if not any(t.fine_tunes for t in chosen):
        raise SpaceError(f"families: {STUDENT} builds an untrained model; add the fine-tuning family (distillation)")
    return chosen


def _model_bundles(model: nn.Module) -> list[Mapping[str, tuple[Any, ...]]]:
    """The default bundles that suit `model`, under flat keys: each searchable technique's `attention_ranges`
    for a model with attention, none otherwise."""
    if not has_attention(model):
        return []
    return [
        {_global_name(technique, setting): values for setting, values in bundle.items()}
        for technique in searchable().values()
        for bundle in settings_of(technique).attention_ranges
    ]


def model_ranges(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    """Default ranges of global settings that suit `model` (flat keys, as `Workload.search_ranges`): what the
    techniques declare for a model with attention (distillation: transformer fine-tuning), none otherwise."""
    return {key: values for bundle in _model_bundles(model) for key, values in bundle.items()}


def global_ranges(
    chosen: Sequence[techniques.Technique],
    model: nn.Module,
    options: SpaceOptions,
    defaults: Mapping[str, Any],
) -> tuple[dict[str, dict[str, tuple[Any, ...]]], dict[str, dict[str, str]]]:
    """The range of every global setting of the `chosen` techniques, and where each came from.

    Precedence, per setting: the user's options (search-space file, flags) > the workload's `defaults` >
    `model_ranges(model)` > the technique's declaration. A model-derived bundle (e.g. a step budget with
    `epochs` 0) is dropped whole when the user or the workload sets any of its settings.
    """
    workload = flat_ranges(defaults)
    given = {(t, s) for source in (options.ranges, workload) for t, settings in source.items() for s in settings}
    derived: dict[str, dict[str, tuple[Any, ...]]] = {}
    for bundle in _model_bundles(model):
        named = [global_setting(key) for key in bundle]
        if not any(found is not None and (found[0].name, found[1]) in given for found in named):
            for technique_name, settings in flat_ranges(bundle, "model defaults").items():
                derived.setdefault(technique_name, {}).update(settings)
    ranges: dict[str, dict[str, tuple[Any, ...]]] = {}
    sources: dict[str, dict[str, str]] = {}
    layers = (("options", options.ranges), ("workload", workload), ("model", derived))
    for technique in chosen:
        for declared in settings_of(technique).globals:
            source = next((name for name, layer in layers if declared.setting in layer.get(technique.name, {})), None)
            if source is not None:
                value = dict(layers)[source][technique.name][declared.setting]
            else:
                value = _declared(declared)
            ranges.setdefault(technique.name, {})[declared.setting] = tuple(value)
            sources.setdefault(technique.name, {})[declared.setting] = source or "technique"
        if technique.name in ranges:
            _check_combinations(technique, ranges[technique.name], sources[technique.name])
    return ranges, sources


def _declared(declared: techniques.GlobalSearch) -> tuple[Any, ...]:
    """The range a technique declares for a global setting: its float bounds, else its choices."""
    value = declared.bounds if declared.bounds is not None else declared.choices
    if value is None:
        raise ValueError(f"global setting {declared.setting!r} declares neither bounds nor choices")
    return value


def _check_combinations(
    technique: techniques.Technique, ranges: Mapping[str, tuple[Any, ...]], sources: Mapping[str, str]
) -> None:
    """Every combination of the searched values (a float range at both ends) must make a valid spec: ranges
    that are each fine may still clash (`epochs` 0 with no step budget), and a trial would fail late."""
    declared = {g.setting: g for g in settings_of(technique).globals}
    axes = [(s, v if declared[s].bounds is None else (v[0], v[-1])) for s, v in ranges.items()]
    names = [s for s, _ in axes]
    for combination in itertools.islice(itertools.product(*(v for _, v in axes)), MAX_CHECKED):
        try:
            technique.spec_type(**dict(zip(names, combination, strict=True)))
        except TypeError:  # the spec needs more than its global settings (a per-layer one): not checked here
            return
        except techniques.SpecError as exc:
            where = ", ".join(f"{s} from {sources[s]}" for s in names if sources[s] != "technique") or "declared"
            raise SpaceError(
                f"{technique.name}: the ranges searched ({where}) allow an invalid setting: {exc}"
            ) from None


def _check_groups_match(options: SpaceOptions, groups: Mapping[str, Mapping[str, tuple[str, ...]]]) -> None:
    """Every group a user named must hold some layer, or the file has a typo the search would hide."""
    found = {group for by_group in groups.values() for group in by_group}
    empty = [name for name, _ in options.groups if name not in found]
    if empty:
        raise SpaceError(f"groups.{empty[0]}: matches no layer that a searched technique can compress")

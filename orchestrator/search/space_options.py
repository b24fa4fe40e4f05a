"""What a user may say about the search space, as one typed record: `SpaceOptions`.

The command line's `--families` and `--grouping` and a search-space JSON file are one route: the file is
parsed into `SpaceOptions`, and a flag the user gave explicitly must not contradict it. Every field is
checked here, before any model is built, and an error names the path of the bad field
(`choices.bits[2]: ...`). Values are checked by the technique that will use them.

File keys: `families`, `grouping`, `groups` (name → layer regex), `choices` (per-layer setting →
values), `exclude` (technique → layer regexes), and, per technique with global settings (e.g.
`distillation`), setting → `[low, high]` for a float range or the list of choices. A workload gives the
same ranges under flat keys (`{"distill.lr": [1e-5, 1e-4]}`, read by `flat_ranges`); the file wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import techniques
from orchestrator.errors import UserError
from orchestrator.files.jsondoc import parse_json

GROUPINGS = ("auto", "layer", "block", "type")
_FIXED_KEYS = ("families", "grouping", "groups", "choices", "exclude")


class SpaceError(UserError):
    """A search-space option or file is invalid; the message names the field."""


@dataclass(frozen=True)
class SpaceOptions:
    """The user's say over the search space; anything unset falls back to what the techniques declare."""

    families: tuple[str, ...] | None = None  # None: every searchable technique
    grouping: str = "auto"
    groups: tuple[tuple[str, str], ...] = ()  # (group name, layer regex), first match wins
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # per-layer setting → values
    ranges: Mapping[str, Mapping[str, tuple[Any, ...]]] = field(default_factory=dict)  # technique → setting → …
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # technique → layer regexes


def searchable() -> dict[str, techniques.Technique]:
    """The registered techniques that offer settings to a search, in canonical order."""
    return {name: t for name, t in techniques.registry().items() if t.search is not None}


def settings_of(technique: techniques.Technique) -> techniques.SearchSettings:
    """What a searchable technique (one `searchable()` returns) offers the search."""
    if technique.search is None:
        raise ValueError(f"{technique.name} offers nothing to a search")
    return technique.search


def per_layer_of(technique: techniques.Technique) -> techniques.LayerSearch:
    """The per-layer setting of a technique that has one (a family with layers in a space)."""
    per_layer = settings_of(technique).per_layer
    if per_layer is None:
        raise ValueError(f"{technique.name} has no per-layer setting")
    return per_layer


def _fail(path: str, message: str) -> SpaceError:
    return SpaceError(f"{path}: {message}")


def _object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, path: str, *, non_empty: bool = True) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(path, f"expected a list, got {type(value).__name__}")
    if non_empty and not value:
        raise _fail(path, "expected a non-empty list")
    return value


def _pattern(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"expected a layer name or re: pattern, got {value!r}")
    try:
        re.compile(value.removeprefix("re:"))
    except re.error as exc:
        raise _fail(path, f"bad regular expression {value!r}: {exc}") from None
    return value


def check_families(value: Any, path: str = "families") -> tuple[str, ...]:
    """The families named (from a file, or `--families`), each a searchable technique."""
    known = searchable()
    names = _list(list(value) if isinstance(value, tuple) else value, path)
    for index, name in enumerate(names):
        if not isinstance(name, str) or name not in known:
            raise _fail(f"{path}[{index}]", f"unknown technique {name!r}; known: {', '.join(known)}")
    return tuple(names)


def _grouping(value: Any) -> str:
    if value not in GROUPINGS:
        raise _fail("grouping", f"one of {', '.join(GROUPINGS)}, got {value!r}")
    return value


def _groups(value: Any) -> tuple[tuple[str, str], ...]:
    return tuple((name, _pattern(pattern, f"groups.{name}")) for name, pattern in _object(value, "groups").items())


def _check_value(
    technique: techniques.Technique, setting: str, value: Any, path: str, context: Mapping[str, Any] | None = None
) -> None:
    """The technique's own spec decides whether it accepts `value` for `setting` — alone, or beside the
    `context` of other settings given with it (`epochs` 0 is valid only beside a step budget)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, f"not a finite number: {value!r}")
    try:
        technique.spec_type(**{setting: value})
    except techniques.SpecError as exc:
        try:
            if context:
                technique.spec_type(**{**context, setting: value})
                return
        except (techniques.SpecError, TypeError):
            pass
        raise _fail(path, str(exc)) from None
    except TypeError as exc:
        raise _fail(path, f"{technique.name} cannot take {value!r}: {exc}") from None


def _choices(value: Any) -> dict[str, tuple[Any, ...]]:
    owners = {per_layer_of(t).setting: t for t in searchable().values() if settings_of(t).per_layer is not None}
    parsed = {}
    for setting, values in _object(value, "choices").items():
        if setting not in owners:
            raise _fail(f"choices.{setting}", f"unknown per-layer setting; known: {', '.join(owners)}")
        per_layer = per_layer_of(owners[setting])
        for index, item in enumerate(_list(values, f"choices.{setting}")):
            if item != per_layer.off or isinstance(item, bool):
                _check_value(owners[setting], setting, item, f"choices.{setting}[{index}]")
        parsed[setting] = tuple(values)
    return parsed


def _exclude(value: Any) -> dict[str, tuple[str, ...]]:
    known = searchable()
    parsed = {}
    for name, patterns in _object(value, "exclude").items():
        if name not in known:
            raise _fail(f"exclude.{name}", f"unknown technique; known: {', '.join(known)}")
        items = _list(patterns, f"exclude.{name}", non_empty=False)
        parsed[name] = tuple(_pattern(p, f"exclude.{name}[{i}]") for i, p in enumerate(items))
    return parsed


def _ranges(technique: techniques.Technique, value: Any, where: str = "") -> dict[str, tuple[Any, ...]]:
    declared = {g.setting: g for g in settings_of(technique).globals}
    parsed = {}
    given = _object(value, where or technique.name)
    for setting, values in given.items():
        path = f"{where or technique.name}.{setting}"
        if setting not in declared:
            raise _fail(path, f"unknown setting; known: {', '.join(declared)}")
        items = _list(values, path)
        context = {s: v[0] for s, v in given.items() if s != setting and s in declared and isinstance(v, list) and v}
        for index, item in enumerate(items):
            _check_value(technique, setting, item, f"{path}[{index}]", context)
        if declared[setting].bounds is not None:
            if len(items) != 2 or not items[0] <= items[1]:
                raise _fail(path, f"expected [low, high] with low <= high, got {items!r}")
            if declared[setting].log and items[0] <= 0:
                raise _fail(path, f"a log-scaled range must be positive, got {items!r}")
        parsed[setting] = tuple(items)
    return parsed


def global_setting(key: str) -> tuple[techniques.Technique, str] | None:
    """The technique and global setting a flat key names (`distill.lr`: prefix or technique name, then the
    setting), or None when no searchable technique declares it."""
    head, _, setting = key.partition(".")
    for technique in searchable().values():
        search = settings_of(technique)
        if head in (search.prefix, technique.name):
            declared = {g.setting for g in search.globals}
            return (technique, setting) if setting in declared else None
    return None


def flat_ranges(value: Mapping[str, Any], path: str = "search_ranges") -> dict[str, dict[str, tuple[Any, ...]]]:
    """Ranges of global settings under flat keys (`{"distill.lr": (1e-5, 1e-4), "distill.steps": [100, 200]}`:
    `[low, high]` or choices, as in a search-space file), checked like the file's, as technique → setting →
    values; a workload declares its ranges so."""
    by_technique: dict[str, tuple[techniques.Technique, str, dict[str, Any]]] = {}
    for key, values in _object(value, path).items():
        found = global_setting(key) if isinstance(key, str) else None
        if found is None:
            known = [
                f"{settings_of(t).prefix or t.name}.{g.setting}"
                for t in searchable().values()
                for g in settings_of(t).globals
            ]
            raise _fail(f"{path}.{key}", f"unknown global setting; known: {', '.join(known)}")
        technique, setting = found
        entry = by_technique.setdefault(technique.name, (technique, key.partition(".")[0], {}))
        entry[2][setting] = list(values) if isinstance(values, tuple) else values
    return {name: _ranges(t, given, f"{path}.{head}") for name, (t, head, given) in by_technique.items()}


def options_from_json(doc: Any) -> SpaceOptions:
    """Parse a search-space document into SpaceOptions, checking every field."""
    doc = _object(doc, "search space")
    with_globals = {name: t for name, t in searchable().items() if settings_of(t).globals}
    unknown = [key for key in doc if key not in _FIXED_KEYS and key not in with_globals]
    if unknown:
        known = ", ".join([*_FIXED_KEYS, *with_globals])
        raise SpaceError(f"unknown search-space key(s) {', '.join(map(repr, unknown))}; known: {known}")
    return SpaceOptions(
        families=check_families(doc["families"]) if "families" in doc else None,
        grouping=_grouping(doc.get("grouping", "auto")),
        groups=_groups(doc.get("groups", {})),
        choices=_choices(doc.get("choices", {})),
        ranges={name: _ranges(t, doc[name]) for name, t in with_globals.items() if name in doc},
        exclude=_exclude(doc.get("exclude", {})),
    )


def load_space_file(path: str | Path) -> SpaceOptions:
    """Read and check a search-space JSON file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise SpaceError(f"cannot read search-space file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SpaceError(f"search-space file {path} is not UTF-8 text") from None
    doc = parse_json(text, f"search-space file {path}", error=SpaceError)
    try:
        return options_from_json(doc)
    except SpaceError as exc:
        raise SpaceError(f"search-space file {path}: {exc}") from None

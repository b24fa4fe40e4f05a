"""Reading policy documents for display: per-layer setting tables and one-line-per-step summaries.

A report must render whatever the search recorded, so a malformed document degrades to "no settings"
instead of failing; validation belongs to `orchestrator.policy`, not here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import techniques
from orchestrator.errors import UserError
from orchestrator.files.jsondoc import parse_json


def layer_settings() -> dict[str, tuple[str, str]]:
    """Heat map title → (step type, field of its `_data` holding the per-layer map), for every technique that
    declares a per-layer search setting (the registry is the one source)."""
    return {
        t.search.per_layer.title: (t.name, t.search.per_layer.setting)
        for t in techniques.registry().values()
        if t.search is not None and t.search.per_layer is not None
    }


_SUMMARY_WIDTH = 110
_DIGITS = re.compile(r"(\d+)")
_ENERGY = re.compile(r"^energy:([0-9.eE+-]+)$")


def _document(policy_json: str | None) -> Any:
    """The parsed policy document; None when it is missing or not strict JSON (a report never fails on it)."""
    try:
        return parse_json(policy_json or "{}", "policy")
    except (UserError, TypeError):
        return None


def steps(policy_json: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(step type, step data) of each step, in order; [] for a missing or malformed document."""
    doc = _document(policy_json)
    raw = doc.get("steps") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        return []
    return [(str(s.get("_type")), s.get("_data") or {}) for s in raw if isinstance(s, dict)]


def policy_name(policy_json: str | None) -> str | None:
    """The policy's optional `name` (reference policies have one, e.g. "int8"), or None."""
    doc = _document(policy_json)
    name = doc.get("name") if isinstance(doc, dict) else None
    return str(name) if name else None


def layer_map(policy_json: str | None, step_type: str, field: str) -> dict[str, Any]:
    """The per-layer map `field` of the step `step_type` (keys as written), without unset (null) entries."""
    for name, data in steps(policy_json):
        value = data.get(field) if isinstance(data, dict) else None
        if name == step_type and isinstance(value, Mapping):
            return {str(k): v for k, v in value.items() if v is not None}
    return {}


def display(value: Any) -> str:
    """A setting as a reader wants it: 4, 0.5, energy:0.9."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def numeric(value: Any) -> float | None:
    """The number a setting can be coloured by (`energy:0.9` → 0.9, `w8a8` → 8), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.startswith("w8a"):
        return 8.0
    match = _ENERGY.match(str(value))
    try:
        return float(match.group(1) if match else value)
    except (TypeError, ValueError):
        return None


def _column_key(key: str) -> tuple[int, list[tuple[int, int | str]]]:
    """Column order: exact layer names, then `re:` patterns, then `_default`; numbers inside names compare as
    numbers (layer2 before layer10), since policy documents may store keys alphabetically."""
    kind = 2 if key == "_default" else 1 if key.startswith("re:") else 0
    return kind, [(1, int(part)) if part.isdigit() else (0, part) for part in _DIGITS.split(key) if part]


@dataclass(frozen=True)
class LayerTable:
    """One setting across the Pareto policies: rows follow the policies, columns the layer keys."""

    title: str
    columns: list[str]
    values: list[list[Any]]  # None where a policy does not set that key


def layer_table(title: str, policies: Sequence[str | None]) -> LayerTable:
    """The `title` setting (a key of `layer_settings()`) of each policy, one column per layer key seen."""
    step_type, field = layer_settings()[title]
    maps = [layer_map(p, step_type, field) for p in policies]
    columns = sorted({key for m in maps for key in m}, key=_column_key)
    return LayerTable(title, columns, [[m.get(c) for c in columns] for m in maps])


def _describe(data: Mapping[str, Any]) -> str:
    """`field{layer=value, ...}` for per-layer maps and `field=value` for set scalars."""
    parts = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            inner = ", ".join(f"{k}={display(v)}" for k, v in value.items() if v is not None)
            if inner:
                parts.append(f"{key}{{{inner}}}")
        elif value is not None and not isinstance(value, list | dict):
            parts.append(f"{key}={display(value)}")
    return " ".join(parts)


def summary(policy_json: str | None) -> list[str]:
    """One short line per step, e.g. `quantization: bits{_default=4, fc2=8} kernel=auto`."""
    lines = []
    for name, data in steps(policy_json):
        line = f"{name}: {_describe(data)}" if isinstance(data, Mapping) else name
        lines.append(line if len(line) <= _SUMMARY_WIDTH else line[: _SUMMARY_WIDTH - 1] + "…")
    return lines

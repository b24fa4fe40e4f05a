"""The record of structural changes that lets a checkpoint rebuild its architecture without pickles.

`describe(model, base)` lists, in module order, every module whose type or shape differs from the
base architecture (new modules included) as `{"name", "type", "config"}`; `rebuild(base, record)`
constructs those modules from an allow-list of types and puts them in place.

A module kept from the base may also have changed integer attributes its forward reads (head pruning lowers an
attention's `num_attention_heads` and `all_head_size`): those are recorded as `{"name", "type": "attributes",
"config": {attribute: value}}`, for an allow-list of attribute names (`ATTRIBUTES`) and only where the value
differs from the base's same-named module. Rebuilding sets them after checking each is allow-listed, a positive
int, and an int attribute the module already has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

import techniques


def _conv_config(m: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _norm_config(m: nn.BatchNorm1d | nn.BatchNorm2d) -> dict[str, Any]:
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


# type name → (config of an instance, constructor from a config)
_BUILTIN: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]], Callable[[dict[str, Any]], nn.Module]]] = {
    "Linear": (
        nn.Linear,
        lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
        lambda c: nn.Linear(**c),
    ),
    "Conv2d": (
        nn.Conv2d,
        _conv_config,
        lambda c: nn.Conv2d(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}),
    ),
    "BatchNorm1d": (nn.BatchNorm1d, _norm_config, lambda c: nn.BatchNorm1d(**c)),
    "BatchNorm2d": (nn.BatchNorm2d, _norm_config, lambda c: nn.BatchNorm2d(**c)),
    "LayerNorm": (
        nn.LayerNorm,
        lambda m: {
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None,
        },
        lambda c: nn.LayerNorm(**{**c, "normalized_shape": tuple(c["normalized_shape"])}),
    ),
    "Sequential": (nn.Sequential, lambda m: {}, lambda c: nn.Sequential()),
}


ATTRIBUTES_TYPE = "attributes"  # the `type` of a record entry that sets integer attributes of a kept module
# Integer attributes a technique may change on a module it keeps (attention head counts and sizes).
ATTRIBUTES = frozenset(
    {
        "num_attention_heads",
        "attention_head_size",
        "all_head_size",
        "num_heads",
        "n_heads",
        "head_dim",
        "head_size",
        "num_key_value_heads",
        "num_key_value_groups",
    }
)


class StructureError(ValueError):
    """A structure record names an unknown module type or a bad configuration."""


def module_entry(module: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(type name, config) for a module we know how to rebuild, else None."""
    cls = techniques.base_type(module)
    builtin = _BUILTIN.get(cls.__name__)
    if builtin is not None and builtin[0] is cls:
        return cls.__name__, builtin[1](module)
    if techniques.module_types().get(cls.__name__) is cls:
        return cls.__name__, module.rebuild_config()
    return None


def _int_attributes(module: nn.Module) -> dict[str, int]:
    """The allow-listed integer attributes the module holds itself (not bools, not properties)."""
    return {
        key: value
        for key, value in vars(module).items()
        if key in ATTRIBUTES and isinstance(value, int) and not isinstance(value, bool)
    }


def changed_attributes(module: nn.Module, original: nn.Module) -> dict[str, int]:
    """The allow-listed integer attributes of `module` whose values differ from `original`'s."""
    before = _int_attributes(original)
    return {key: value for key, value in _int_attributes(module).items() if key in before and before[key] != value}


def describe(model: nn.Module, base: nn.Module) -> list[dict[str, Any]]:
    """Every module of `model` that is new or differs from the same-named module of `base`."""
    base_modules = dict(base.named_modules())
    record = []
    for name, module in model.named_modules():
        if not name:
            continue
        entry = module_entry(module)
        if entry is None:
            if name not in base_modules or type(base_modules[name]) is not techniques.base_type(module):
                raise StructureError(f"cannot record module {name!r} of type {type(module).__name__}")
            attributes = changed_attributes(module, base_modules[name])
            if attributes:
                record.append({"name": name, "type": ATTRIBUTES_TYPE, "config": attributes})
            continue
        original = base_modules.get(name)
        if original is None or module_entry(original) != entry:
            record.append({"name": name, "type": entry[0], "config": entry[1]})
    return record


_CONFIG_KEYS = {
    "Linear": {"in_features", "out_features", "bias"},
    "Conv2d": {
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "bias",
        "padding_mode",
    },
    "BatchNorm1d": {"num_features", "eps", "momentum", "affine", "track_running_stats"},
    "BatchNorm2d": {"num_features", "eps", "momentum", "affine", "track_running_stats"},
    "LayerNorm": {"normalized_shape", "eps", "elementwise_affine", "bias"},
    "Sequential": set(),
}
# What constructing an allow-listed module from a bad (hand-edited) config can raise.
_BUILD_ERRORS = (LookupError, TypeError, AttributeError, ValueError, RuntimeError, ArithmeticError, MemoryError)


def build_module(type_name: str, config: dict[str, Any]) -> nn.Module:
    """Construct one recorded module from the allow-list (built-in layers and registered packed layers)."""
    if type_name in _BUILTIN:
        if set(config) != _CONFIG_KEYS[type_name]:
            raise StructureError(f"{type_name} config has keys {sorted(config)}, not {sorted(_CONFIG_KEYS[type_name])}")
        return _BUILTIN[type_name][2](config)
    cls = techniques.module_types().get(type_name)
    if cls is None:
        raise StructureError(f"unknown module type {type_name!r} in structure record")
    return cls.from_rebuild_config(config)


def _check_place(model: nn.Module, name: str) -> None:
    """A recorded module replaces one the model has, or appends the next child of a Sequential."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if parent is not None and child in dict(parent.named_children()):
        return
    if isinstance(parent, nn.Sequential) and child == str(len(parent)):
        return
    raise StructureError(f"structure record names module {name!r}, which the model does not have")


def set_attributes(model: nn.Module, name: str, config: dict[str, Any]) -> None:
    """Set recorded integer attributes of the kept module `name`, each checked against the allow-list."""
    try:
        if not isinstance(name, str) or not name:
            raise AttributeError(name)
        module = model.get_submodule(name)
    except AttributeError:
        raise StructureError(f"structure record names module {name!r}, which the model does not have") from None
    if not isinstance(config, dict) or not config:
        raise StructureError("an attributes entry needs a non-empty object of attribute → value")
    held = _int_attributes(module)
    for key, value in config.items():
        if key not in ATTRIBUTES:
            raise StructureError(f"attribute {key!r} is not one a structure record may set")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StructureError(f"attribute {key!r} must be a positive integer, got {value!r}")
        if key not in held:
            raise StructureError(f"{type(module).__name__} has no integer attribute {key!r}")
    for key, value in config.items():
        setattr(module, key, value)


def rebuild(base: nn.Module, record: list[dict[str, Any]]) -> nn.Module:
    """Apply a structure record to a freshly built base architecture (in place; returns it)."""
    for entry in record:
        name = entry.get("name") if isinstance(entry, dict) else None
        try:
            if entry["type"] == ATTRIBUTES_TYPE:
                set_attributes(base, entry["name"], entry["config"])
                continue
            _check_place(base, entry["name"])
            module = build_module(entry["type"], entry["config"])
            techniques.set_module(base, entry["name"], module)
        except StructureError as exc:
            raise StructureError(f"bad structure entry {name!r}: {exc}") from None
        except _BUILD_ERRORS as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StructureError(f"bad structure entry {name!r}: {reason}") from None
    return base

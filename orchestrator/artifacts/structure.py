"""The record of structural changes that lets a checkpoint rebuild its architecture without pickles.

`describe(model, base)` lists, in module order, every module whose type or shape differs from the
base architecture (new modules included) as `{"name", "type", "config"}`; `rebuild(base, record)`
constructs those modules from an allow-list of types and puts them in place.

A module kept from the base may also have changed integer attributes its forward reads (head pruning lowers an
attention's `num_attention_heads` and `all_head_size`): those are recorded as `{"name", "type": "attributes",
"config": {attribute: value}}`, for an allow-list of attribute names (`ATTRIBUTES`) and only where the value
differs from the base's same-named module. Rebuilding sets them after checking each is allow-listed, a positive
int, and an int attribute the module already has.

Decoder language models add three kinds of entry (`techniques.decoder_layout` says where a model holds them):
- a Conv1D (transformers' GPT-2 projection) is recorded like a Linear, `{"nf", "nx"}`;
- `{"name": stack, "type": "blocks", "config": {"kept": [...], "of": n}}`: depth pruning kept blocks `kept` (their
  indices in the base's stack of `n`); the entries after it name the kept blocks by their new positions, and
  `describe` compares each with the base block it came from (the stack's `source_layers`);
- `{"name": "config", "type": "config", "config": {field: value}}`: the model config's shape fields that changed
  (named `lm.config` where a wrapper holds the transformers model as `lm`)
  (`CONFIG_FIELDS`: block count, head counts, head size, FFN width, `layer_types`).
Rebuilding checks a `blocks` entry against the base's stack, that every kept block's `layer_idx` (the KV cache's
index) is its position, and that a config's `layer_types` has one entry per block, each one the base already uses.

A record is input, so what it claims is checked against what it can be checked against before it is believed:
`rebuild` builds each recorded module on the meta device first (nothing allocated) and compares every tensor it
would hold with the weights file's header, so a small file cannot make the loader allocate gigabytes; an
embedding keeps the rows of the one it replaces (no technique shrinks a vocabulary, and a missing row is an
IndexError at the first lookup); a module's recorded attributes must fit its tensors (no head larger than every
weight, heads × head size = what the query projection yields).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, cast

import torch
from torch import nn

import techniques
from techniques.decoder_layout import SOURCE_LAYERS, is_conv1d, model_config
from techniques.head_pruning import HEAD_COUNTS, HEAD_SIZES, PROJECTIONS, TOTALS


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


def _conv(config: dict[str, Any]) -> nn.Conv2d:
    """A Conv2d from its recorded config (JSON lists back to the tuples its constructor takes)."""
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return nn.Conv2d(**kwargs)


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
        _conv,
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
        "split_size",  # GPT-2 attention: heads × head size, where its forward splits c_attn's outputs
        "intermediate_size",  # LlamaMLP's width
        "layer_idx",  # a decoder block's attention: its position, the KV cache's index
    }
)
NON_NEGATIVE = frozenset({"layer_idx"})  # attributes that may be 0 (the others are positive)
BLOCKS_TYPE = "blocks"  # an entry keeping some blocks of a ModuleList (depth pruning)
CONFIG_TYPE = "config"  # the entry setting fields of the model's transformers config (named `config`, `lm.config`)
CONFIG_COUNTS = frozenset(
    {"num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads", "head_dim"}
    | {"intermediate_size", "n_inner"}
)
CONFIG_FIELDS = CONFIG_COUNTS | {"layer_types"}


class _Rebuildable(Protocol):
    """A module type registered with `techniques.rebuildable`: it has both methods (checked at registration)."""

    def rebuild_config(self) -> dict[str, Any]: ...

    @classmethod
    def from_rebuild_config(cls, config: dict[str, Any]) -> nn.Module: ...


class StructureError(ValueError):
    """A structure record names an unknown module type or a bad configuration."""


def module_entry(module: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(type name, config) for a module we know how to rebuild, else None."""
    cls = techniques.base_type(module)
    builtin = _BUILTIN.get(cls.__name__)
    if builtin is not None and builtin[0] is cls:
        return cls.__name__, builtin[1](module)
    if techniques.module_types().get(cls.__name__) is cls:
        return cls.__name__, cast(_Rebuildable, module).rebuild_config()
    if is_conv1d(module):
        return "Conv1D", {"nf": module.nf, "nx": module.nx}
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


def _kept_stacks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Depth-pruned stacks of `model`: name → each block's index in the original stack."""
    return {
        name: sources
        for name, module in model.named_modules()
        if type(module) is nn.ModuleList and isinstance(sources := getattr(module, SOURCE_LAYERS, None), tuple)
    }


def _source_name(name: str, stacks: Mapping[str, tuple[int, ...]]) -> str:
    """The name a module of a depth-pruned model had in the original: `model.layers.1.mlp` → `model.layers.2.mlp`."""
    for stack, sources in stacks.items():
        if name.startswith(f"{stack}."):
            index, _, rest = name[len(stack) + 1 :].partition(".")
            return f"{stack}.{sources[int(index)]}" + (f".{rest}" if rest else "")
    return name


def _blocks_entry(name: str, sources: tuple[int, ...], original: nn.Module | None) -> dict[str, Any]:
    if type(original) is not nn.ModuleList:
        raise StructureError(f"cannot record stack {name!r}: the base architecture has no ModuleList there")
    return {"name": name, "type": BLOCKS_TYPE, "config": {"kept": list(sources), "of": len(original)}}


def _module_entries(name: str, module: nn.Module, original: nn.Module | None) -> list[dict[str, Any]]:
    """The entries recording how `module` differs from the base's `original` (none when it does not)."""
    entry = module_entry(module)
    if entry is None:
        if original is None or type(original) is not techniques.base_type(module):
            raise StructureError(f"cannot record module {name!r} of type {type(module).__name__}")
        attributes = changed_attributes(module, original)
        return [{"name": name, "type": ATTRIBUTES_TYPE, "config": attributes}] if attributes else []
    if original is None or module_entry(original) != entry:
        return [{"name": name, "type": entry[0], "config": entry[1]}]
    return []


def _config_of(model: nn.Module) -> tuple[str | None, Any]:
    """(its entry's name, the model's transformers config) — `config`, or `lm.config` in a user's wrapper —
    else (None, None)."""
    found = model_config(model)
    return (f"{found[0]}.config".lstrip("."), found[1]) if found else (None, None)


def _config_entries(model: nn.Module, base: nn.Module) -> list[dict[str, Any]]:
    (name, config), (_, original) = _config_of(model), _config_of(base)
    if config is None or original is None:
        return []
    now, before = vars(config), vars(original)
    changed = {key: now[key] for key in sorted(CONFIG_FIELDS) if key in now and now[key] != before.get(key)}
    if isinstance(changed.get("layer_types"), tuple):
        changed["layer_types"] = list(changed["layer_types"])
    return [{"name": name, "type": CONFIG_TYPE, "config": changed}] if changed else []


def describe(model: nn.Module, base: nn.Module) -> list[dict[str, Any]]:
    """Every module of `model` that is new or differs from the module of `base` it came from (the same name, or in a
    depth-pruned stack the block it was), then the config fields that changed."""
    base_modules = dict(base.named_modules())
    stacks = _kept_stacks(model)
    record = []
    for name, module in model.named_modules():
        if not name:
            continue
        if name in stacks:
            record.append(_blocks_entry(name, stacks[name], base_modules.get(name)))
            continue
        record += _module_entries(name, module, base_modules.get(_source_name(name, stacks)))
    return record + _config_entries(model, base)


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
    "Conv1D": {"nf", "nx"},
}
# What constructing an allow-listed module from a bad (hand-edited) config can raise.
_BUILD_ERRORS = (LookupError, TypeError, AttributeError, ValueError, RuntimeError, ArithmeticError, MemoryError)


def build_module(type_name: str, config: dict[str, Any]) -> nn.Module:
    """Construct one recorded module from the allow-list (built-in layers and registered packed layers)."""
    if type_name in _BUILTIN:
        if set(config) != _CONFIG_KEYS[type_name]:
            raise StructureError(f"{type_name} config has keys {sorted(config)}, not {sorted(_CONFIG_KEYS[type_name])}")
        return _BUILTIN[type_name][2](config)
    if type_name == "Conv1D":
        return _conv1d(config)
    cls = techniques.module_types().get(type_name)
    if cls is None:
        raise StructureError(f"unknown module type {type_name!r} in structure record")
    return cast(type[_Rebuildable], cls).from_rebuild_config(config)


def _positive(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StructureError(f"{key!r} must be a positive integer, got {value!r}")
    return value


def _conv1d(config: dict[str, Any]) -> nn.Module:
    """transformers' Conv1D (GPT-2's projections), imported only when a record names one."""
    from transformers.pytorch_utils import Conv1D

    if set(config) != _CONFIG_KEYS["Conv1D"]:
        raise StructureError(f"Conv1D config has keys {sorted(config)}, not ['nf', 'nx']")
    return Conv1D(_positive(config, "nf"), _positive(config, "nx"))


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
        least = 0 if key in NON_NEGATIVE else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "a non-negative" if least == 0 else "a positive"
            raise StructureError(f"attribute {key!r} must be {kind} integer, got {value!r}")
        if key not in held:
            raise StructureError(f"{type(module).__name__} has no integer attribute {key!r}")
    for key, value in config.items():
        setattr(module, key, value)


def keep_blocks(model: nn.Module, name: str, config: dict[str, Any]) -> None:
    """Replace the ModuleList `name` by its blocks `config["kept"]` (indices into its `config["of"]` blocks)."""
    stack = _existing(model, name) if isinstance(name, str) and name else None
    if type(stack) is not nn.ModuleList:
        raise StructureError(f"structure record keeps blocks of {name!r}, which is not a ModuleList of the model")
    if not isinstance(config, dict) or set(config) != {"kept", "of"}:
        raise StructureError("a blocks entry needs exactly 'kept' and 'of'")
    if _positive(config, "of") != len(stack):
        raise StructureError(f"it keeps blocks of {config['of']}; the stack has {len(stack)}")
    kept = config["kept"]
    valid = isinstance(kept, list) and kept and all(type(i) is int for i in kept)
    if not valid or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= len(stack):
        raise StructureError(f"'kept' must list block indices in [0, {len(stack)}) in increasing order, got {kept!r}")
    new = nn.ModuleList([stack[i] for i in kept])
    setattr(new, SOURCE_LAYERS, tuple(kept))
    techniques.set_module(model, name, new)


def check_positions(stack: nn.ModuleList) -> None:
    """Every kept block's `layer_idx` (the KV cache's index) is its position in the stack."""
    for position, block in enumerate(stack):
        for module in block.modules():
            index = vars(module).get("layer_idx")
            if isinstance(index, int) and index != position:
                raise StructureError(f"block {position} has layer_idx {index}; the KV cache needs {position}")


def set_config(model: nn.Module, name: str, fields: dict[str, Any]) -> None:
    """Set recorded fields of the model's transformers config, each allow-listed and of its kind."""
    expected, config = _config_of(model)
    if config is None or name != expected:
        raise StructureError(f"the model's transformers config is {expected!r}, not {name!r}")
    if not isinstance(fields, dict) or not fields:
        raise StructureError("a config entry needs a non-empty object of field → value")
    for key in fields:
        if key not in CONFIG_FIELDS:
            raise StructureError(f"config field {key!r} is not one a structure record may set")
        if key in CONFIG_COUNTS:
            _positive(fields, key)
    if "layer_types" in fields:
        known = set(getattr(config, "layer_types", None) or ())
        types = fields["layer_types"]
        if not isinstance(types, list) or not types or not all(isinstance(t, str) and t in known for t in types):
            raise StructureError(f"'layer_types' must list layer types the base config uses ({sorted(known)})")
    for key, value in fields.items():
        setattr(config, key, value)


def check_config(model: nn.Module) -> None:
    """A config's `layer_types` has one entry per block."""
    config = _config_of(model)[1]
    types, blocks = getattr(config, "layer_types", None), getattr(config, "num_hidden_layers", None)
    if isinstance(types, list) and len(types) != blocks:
        raise StructureError(f"the config lists {len(types)} layer types for {blocks} blocks")


_SETTERS: dict[str, Callable[[nn.Module, str, dict[str, Any]], None]] = {
    ATTRIBUTES_TYPE: set_attributes,
    BLOCKS_TYPE: keep_blocks,
    CONFIG_TYPE: set_config,
}


@contextlib.contextmanager
def _entry(name: Any) -> Iterator[None]:
    """Errors from one record entry as one StructureError naming it."""
    try:
        yield
    except StructureError as exc:
        raise StructureError(f"bad structure entry {name!r}: {exc}") from None
    except _BUILD_ERRORS as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StructureError(f"bad structure entry {name!r}: {reason}") from None


def _name(entry: Any) -> Any:
    return entry.get("name") if isinstance(entry, dict) else None


def _check_claims(entry: dict[str, Any], held: Mapping[str, tuple[int, ...]], replaced: tuple[str, ...]) -> None:
    """Every tensor the entry's module would hold has the shape the weights file records for it (the module is
    built on the meta device: nothing is allocated); tensors under `replaced` (names later entries rebuild) aside."""
    with torch.device("meta"):
        module = build_module(entry["type"], entry["config"])
    for key, tensor in module.state_dict().items():
        key = f"{entry['name']}.{key}"
        if not key.startswith(replaced) and held.get(key) != tuple(tensor.shape):
            found = f"shape {list(held[key])}" if key in held else "no such tensor"
            raise StructureError(f"it gives {key} shape {list(tensor.shape)}; the weights hold {found}")


def _existing(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_rows(original: nn.Module | None, module: nn.Module) -> None:
    """An embedding keeps the rows of the one it replaces: every id the model is fed must have a row."""
    rows, before = getattr(module, "num_embeddings", None), getattr(original, "num_embeddings", None)
    if isinstance(before, int) and rows != before:
        raise StructureError(f"an embedding of {rows} rows replaces one of {before}; no technique removes rows")


def _outputs(module: nn.Module | None) -> Any:
    """The output width a projection yields: its own `out_features`, or the last layer's of a factored one."""
    if isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return getattr(module, "out_features", None)


def check_attributes(module: nn.Module, recorded: Mapping[str, Any]) -> None:
    """Recorded attributes fit the module's tensors: none exceeds every tensor dimension, and its head count ×
    head size is its `all_head_size` and what its query projection yields."""
    widest = max((size for t in [*module.parameters(), *module.buffers()] for size in t.shape), default=0)
    for key, value in recorded.items():
        if value > widest and key not in NON_NEGATIVE:  # a block's position is checked against its stack
            raise StructureError(f"attribute {key!r} = {value} exceeds every dimension of the module's weights")
    held = _int_attributes(module)
    count = next((held[k] for k in HEAD_COUNTS if k in held), None)
    size = next((held[k] for k in HEAD_SIZES if k in held), None)
    if count is None or size is None:
        return
    children = dict(module.named_children())
    totals: dict[str, float] = {key: held[key] for key in TOTALS if key in held}
    query = next((_outputs(children[t[0]]) for t in PROJECTIONS if t[0] in children), None)
    if query is not None:
        totals["the query projection's outputs"] = query
    if "split_size" in held:  # GPT-2: c_attn yields query, key and value blocks of split_size each
        totals["split_size"] = held["split_size"]
        fused = children.get("c_attn")
        if is_conv1d(fused):
            totals["a third of c_attn's outputs"] = cast(Any, fused).nf / 3  # transformers' Conv1D: outputs `nf`
    for key, total in totals.items():
        if total != count * size:
            raise StructureError(f"{count} heads of size {size} do not make {key} = {total}")


def rebuild(
    base: nn.Module, record: list[dict[str, Any]], held: Mapping[str, tuple[int, ...]] | None = None
) -> nn.Module:
    """Apply a structure record to a freshly built base architecture (in place; returns it).

    With `held` (each tensor's shape in the weights file), a recorded module is built only once the file holds
    every tensor it claims, so a small file cannot make the loader allocate what it does not back."""
    names = [f"{_name(entry)}." for entry in record]
    for index, entry in enumerate(record):
        with _entry(_name(entry)):
            if entry["type"] in _SETTERS:
                _SETTERS[entry["type"]](base, entry["name"], entry["config"])
                continue
            _check_place(base, entry["name"])
            if held is not None:
                _check_claims(entry, held, tuple(names[index + 1 :]))
            module = build_module(entry["type"], entry["config"])
            _check_rows(_existing(base, entry["name"]), module)
            techniques.set_module(base, entry["name"], module)
    for entry in record:  # once every module is in place: a pruned attention's projections come after it
        with _entry(entry["name"]):
            if entry["type"] == ATTRIBUTES_TYPE:
                check_attributes(base.get_submodule(entry["name"]), entry["config"])
            elif entry["type"] == BLOCKS_TYPE:
                check_positions(cast(nn.ModuleList, base.get_submodule(entry["name"])))  # its setter built one
            elif entry["type"] == CONFIG_TYPE:
                check_config(base)
    return base

"""What every technique shares: spec base class, per-layer settings, registry, apply context."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from torch import nn
from torch.nn.utils import parametrize

from techniques.tools.inputs import Inputs, OutputFn, call_model, main_output, to_device

LAYER_DEFAULT = "_default"
REGEX_PREFIX = "re:"


class SpecError(ValueError):
    """A technique spec, per-layer setting or serialised document is invalid; the message says why."""


# --------------------------------------------------------------------------- per-layer settings


@dataclass(frozen=True)
class LayerMap:
    """Per-layer values addressed by name: exact name, then `re:` regex (in order), then `_default`.

    A name also matches the layer it was factored from: the setting for `fc1` applies to `fc1.0`
    and `fc1.1` after low-rank factorisation replaced `fc1` by a two-layer sequence.
    """

    entries: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, value: LayerMap | Mapping[str, Any] | Any) -> LayerMap:
        """A LayerMap from a mapping, or from a scalar meaning 'this value for every layer'."""
        if isinstance(value, LayerMap):
            return value
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str) or not key:
                    raise SpecError(f"per-layer keys must be non-empty strings, got {key!r}")
                if key.startswith(REGEX_PREFIX):
                    try:
                        re.compile(key[len(REGEX_PREFIX) :])
                    except re.error as exc:
                        raise SpecError(f"bad regular expression {key!r}: {exc}") from None
            return cls(tuple(value.items()))
        return cls(((LAYER_DEFAULT, value),))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.entries)

    def values(self) -> list[Any]:
        return [value for _, value in self.entries]

    def resolve(self, name: str) -> Any | None:
        """The value for layer `name`, or None when no key addresses it."""
        exact = dict(self.entries)
        candidate = name
        while True:
            if candidate in exact:
                return exact[candidate]
            if "." not in candidate:
                break
            candidate = candidate.rsplit(".", 1)[0]
        for key, value in self.entries:
            if key.startswith(REGEX_PREFIX) and re.fullmatch(key[len(REGEX_PREFIX) :], name):
                return value
        return exact.get(LAYER_DEFAULT)

    def unmatched_keys(self, names: Iterable[str]) -> list[str]:
        """Keys (other than `_default`) that address none of `names`."""
        names = list(names)
        unmatched = []
        for key, _ in self.entries:
            if key == LAYER_DEFAULT:
                continue
            if key.startswith(REGEX_PREFIX):
                pattern = re.compile(key[len(REGEX_PREFIX) :])
                hit = any(pattern.fullmatch(n) for n in names)
            else:
                hit = any(n == key or n.startswith(key + ".") for n in names)
            if not hit:
                unmatched.append(key)
        return unmatched


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TechniqueSpec:
    """Base of every technique's frozen spec; subclasses validate in `__post_init__`.

    Fields annotated `LayerMap` hold per-layer settings; they accept a mapping or a scalar and are
    normalised to a LayerMap. Serialised form: `{"_type", "_version", "_data"}`.
    """

    technique: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if _is_layer_map(type(self), f.name):
                object.__setattr__(self, f.name, LayerMap.of(getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Raise SpecError when a value is out of range (override in subclasses)."""

    def layer_maps(self) -> dict[str, LayerMap]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if _is_layer_map(type(self), f.name)}

    def to_json(self) -> dict[str, Any]:
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = value.as_dict() if isinstance(value, LayerMap) else _plain(value)
        return {"_type": self.technique, "_version": self.version, "_data": data}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> TechniqueSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"{cls.technique}: settings must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(
                f"{cls.technique}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SpecError(f"{cls.technique}: {exc}") from None


def _is_layer_map(cls: type, name: str) -> bool:
    hints = typing.get_type_hints(cls)
    return hints.get(name) is LayerMap


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def is_number(value: Any) -> bool:
    """Whether `value` is a finite real number: an int or a finite float, never a bool (nan and inf are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def is_integer(value: Any) -> bool:
    """Whether `value` is an int, never a bool, nor a float with an integral value such as 8.0."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(technique: str, what: str, value: Any, low: float, high: float, *, layer: str | None = None) -> None:
    """Raise SpecError unless value is a finite real number (not a bool) with low <= value <= high."""
    where = f" for layer {layer!r}" if layer else ""
    if not is_number(value) or not (low <= value <= high):
        raise SpecError(f"{technique}: {what}{where} must be in [{low}, {high}], got {value!r}")


def check_int(technique: str, what: str, value: Any, low: int, high: int, *, layer: str | None = None) -> None:
    """Raise SpecError unless value is an int (not a bool, not a float such as 8.0) with low <= value <= high."""
    where = f" for layer {layer!r}" if layer else ""
    if not is_integer(value) or not (low <= value <= high):
        raise SpecError(f"{technique}: {what}{where} must be an integer in [{low}, {high}], got {value!r}")


# --------------------------------------------------------------------------- apply context


@dataclass
class Context:
    """What a technique may use besides the model: inputs, data, device, seed, and a log of notes.

    Data come as callables so nothing is materialised unless a technique needs it:
    `calibration()` yields input batches; `train_batches(epoch)` yields (inputs, targets) batches in a
    deterministic order for that epoch; `evaluate(model)` returns the validation metric (higher is better).
    Inputs are a tensor, tuple or dict of tensors (`techniques.tools.inputs`); `run(model, inputs)` calls the model
    on them and reduces its output with `output_fn`; `distill_loss(student_out, teacher_out, inputs)`, when
    given, is the workload's own distillation loss; `build_student(width)`, when given, builds the workload's
    lighter student architecture (untrained) for the student technique.
    """

    example_inputs: Inputs
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    calibration: Callable[[], Iterable[Inputs]] | None = None
    train_batches: Callable[[int], Iterable[tuple[Inputs, torch.Tensor]]] | None = None
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    output_fn: OutputFn = main_output
    distill_loss: Callable[[torch.Tensor, torch.Tensor, Inputs], torch.Tensor] | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    teacher: nn.Module | None = None
    on_epoch: Callable[[int, float], None] | None = None
    build_student: Callable[[float], nn.Module] | None = None
    notes: list[dict[str, Any]] = field(default_factory=list)

    def run(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """The model's output tensor on a batch (moved to the model's device), reduced by `output_fn`."""
        device = next((p.device for p in model.parameters()), self.device)
        return self.output_fn(call_model(model, to_device(inputs, device)))

    def note(self, technique: str, layer: str | None, message: str, **data: Any) -> None:
        """Record what a technique did or skipped (shown in metrics and reports)."""
        self.notes.append({"technique": technique, "layer": layer, "message": message, **data})


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class LayerSearch:
    """The per-layer setting a technique offers the search space; the technique is its only source.

    `choices` are the values searched by default (`off` among them); `off` leaves a layer alone and never
    appears in a policy; `title` is how reports name the setting; `eligible(layers)` picks, from the
    `(name, module)` layers of the technique's types in model order, those worth searching (default: all).
    """

    setting: str
    choices: tuple[Any, ...]
    off: Any
    title: str
    eligible: Callable[[Sequence[tuple[str, nn.Module]]], list[str]] | None = None

    def eligible_layers(self, layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
        return self.eligible(layers) if self.eligible is not None else [name for name, _ in layers]


@dataclass(frozen=True)
class GlobalSearch:
    """A whole-model setting a technique offers the search: `bounds` (a float range, `log`-uniform if set)
    or `choices`; `reference` is the value the search's reference policies use (clipped into the range)."""

    setting: str
    bounds: tuple[float, float] | None = None
    choices: tuple[Any, ...] | None = None
    log: bool = False
    reference: Any = None


@dataclass(frozen=True)
class SearchSettings:
    """What a technique offers the search space.

    A technique with a `per_layer` setting compresses, and the search picks which of those to combine; one
    with only `globals` that fine-tunes (distillation, `Technique.fine_tunes`) joins every policy that
    compresses; one with only `globals` that does not fine-tune (student) is a family of its own, combined like
    the per-layer ones. Global parameters are named `{prefix}.{setting}` in the search space.
    `attention_ranges` are the global settings' defaults for a model with attention, in bundles that apply whole
    (setting → bounds or choices): a bundle is dropped when the user or the workload sets any of its settings.
    """

    per_layer: LayerSearch | None = None
    globals: tuple[GlobalSearch, ...] = ()
    prefix: str = ""
    attention_ranges: tuple[Mapping[str, tuple[Any, ...]], ...] = field(default=(), hash=False)


@dataclass(frozen=True)
class Technique:
    """A registered technique: its spec type, apply function and what it offers to a search space.

    `stage` fixes the canonical order (student 5 → low-rank 10 → structured pruning 20 → unstructured pruning 30 →
    quantization 40 → distillation 50); a policy whose steps go backwards in stage is rejected.
    `fine_tunes` marks the technique that owns the training loop (the executor reports its epochs).
    """

    name: str
    spec_type: type[TechniqueSpec]
    apply: Callable[[nn.Module, Any, Context], nn.Module]
    layer_types: tuple[type[nn.Module], ...]
    stage: int
    search: SearchSettings | None = None
    structural: bool = False
    fine_tunes: bool = False


_REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    if technique.name in _REGISTRY:
        raise RuntimeError(f"technique {technique.name!r} registered twice")
    if technique.spec_type.technique != technique.name:
        raise RuntimeError(f"spec {technique.spec_type.__name__} names {technique.spec_type.technique!r}")
    _REGISTRY[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    """Remove a registered technique (for techniques registered by tests or plugins at run time)."""
    _REGISTRY.pop(name, None)


def registry() -> Mapping[str, Technique]:
    """Every registered technique, in canonical (stage) order."""
    _load_builtin()
    return {t.name: t for t in sorted(_REGISTRY.values(), key=lambda t: t.stage)}


def get(name: str) -> Technique:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown technique {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def spec_from_json(doc: Any) -> TechniqueSpec:
    """Build a spec from its `{"_type", "_version", "_data"}` form; only registered types load."""
    if not isinstance(doc, Mapping) or set(doc) != {"_type", "_version", "_data"}:
        raise SpecError('a technique step must be an object with exactly "_type", "_version" and "_data"')
    technique = get(doc["_type"]) if isinstance(doc["_type"], str) else get(repr(doc["_type"]))
    expected = technique.spec_type.version
    if doc["_version"] != expected:
        raise SpecError(f"{technique.name}: unsupported version {doc['_version']!r} (this build reads {expected})")
    return technique.spec_type.from_data(doc["_data"])


def apply_spec(model: nn.Module, spec: TechniqueSpec, ctx: Context) -> nn.Module:
    """Apply one spec through its registered technique."""
    return get(spec.technique).apply(model, spec, ctx)


def layers_of(model: nn.Module, types: tuple[type[nn.Module], ...]) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of the given types (exact type match, so subclasses such as packed layers are not
    mistaken for plain ones; a layer with parametrisations counts as its original type)."""
    for name, module in model.named_modules():
        if name and base_type(module) in types:
            yield name, module


def base_type(module: nn.Module) -> type[nn.Module]:
    """The module's class, seeing through the subclass torch.nn.utils.parametrize generates."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls


def resolve_layers(
    model: nn.Module, settings: LayerMap, types: tuple[type[nn.Module], ...], technique: str
) -> list[tuple[str, nn.Module, Any]]:
    """(name, module, value) for each layer of `types` that `settings` addresses.

    Raises SpecError naming the key when a per-layer key addresses no eligible layer.
    """
    layers = list(layers_of(model, types))
    unmatched = settings.unmatched_keys(name for name, _ in layers)
    if unmatched:
        kinds = "/".join(t.__name__ for t in types)
        raise SpecError(
            f"{technique}: layer key(s) {', '.join(map(repr, unmatched))} match no {kinds} layer of the model"
        )
    resolved = []
    for name, module in layers:
        value = settings.resolve(name)
        if value is not None:
            resolved.append((name, module, value))
    return resolved


def weight_of(module: nn.Module) -> torch.Tensor:
    """`module.weight` as the tensor it is on a Linear/Conv2d (parametrised or not).

    torch types every module attribute `Tensor | Module`; this narrows it, failing loudly on a module whose
    `weight` is something else.
    """
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is a {type(weight).__name__}, not a tensor")
    return weight


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """`module.bias` of a Linear/Conv2d: a tensor, or None for a layer built with `bias=False`."""
    bias = module.bias
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.bias is a {type(bias).__name__}, not a tensor")
    return bias


def parametrizations_of(module: nn.Module, tensor_name: str = "weight") -> parametrize.ParametrizationList:
    """The parametrisations registered on `module.<tensor_name>` (the module must be parametrised there)."""
    registered = typing.cast(nn.ModuleDict, module.parametrizations)
    return typing.cast(parametrize.ParametrizationList, registered[tensor_name])


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _load_builtin() -> None:
    # Importing the technique modules, and the packed module types finalize inserts, registers them; done lazily
    # so `import techniques` stays light.
    import importlib

    order = ("student", "lowrank", "head_pruning", "decoder_heads", "channel_pruning", "decoder_ffn", "decoder_depth")
    for module in (*order, "pruning", "quantization", "distillation"):
        importlib.import_module(f"techniques.{module}")
    for module in ("layers", "embedding"):
        importlib.import_module(f"techniques.packed.{module}")


# --------------------------------------------------------------------------- rebuildable modules

_MODULE_TYPES: dict[str, type[nn.Module]] = {}


def rebuildable(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: a module type a technique inserts, which checkpoints can rebuild from JSON.

    The class implements `rebuild_config() -> dict` (JSON-safe constructor arguments, shapes included)
    and `from_rebuild_config(config) -> module` (a module whose state_dict has the same keys and shapes,
    ready for `load_state_dict`); subclassing `RebuildableModule` gives the second and a `repr`.
    """
    for method in ("rebuild_config", "from_rebuild_config"):
        if not hasattr(cls, method):
            raise TypeError(f"{cls.__name__} must define {method}")
    _MODULE_TYPES[cls.__name__] = cls
    return cls


class RebuildableModule(nn.Module):
    """Base for module types registered with `rebuildable`: rebuilt empty from `rebuild_config()` as the
    constructor's keyword arguments, and shown by them in `repr`."""

    def rebuild_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_rebuild_config(cls, config: dict[str, Any]) -> Self:
        return cls(**config)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.rebuild_config().items())


def module_types() -> Mapping[str, type[nn.Module]]:
    _load_builtin()
    return dict(_MODULE_TYPES)


# --------------------------------------------------------------------------- shared parametrisation


class WeightMask(nn.Module):
    """Parametrisation that keeps pruned weights at zero through fine-tuning (`weight = original * mask`).

    Unstructured pruning registers it on a layer's weight with `torch.nn.utils.parametrize`; finalize
    bakes it in and stores the layer sparsely.
    """

    mask: torch.Tensor  # registered buffer (bool)

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

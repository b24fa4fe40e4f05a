"""Compression techniques: one module each, a frozen spec and a registered `apply(model, spec, ctx)`.

Importing this package is light: technique modules (and their heavy imports such as tensorly and
torch_pruning) load on first use of the registry.
"""

from __future__ import annotations

from techniques._base import (
    LAYER_DEFAULT,
    Context,
    GlobalSearch,
    LayerMap,
    LayerSearch,
    RebuildableModule,
    SearchSettings,
    SpecError,
    Technique,
    TechniqueSpec,
    WeightMask,
    apply_spec,
    base_type,
    get,
    layers_of,
    module_types,
    rebuildable,
    register,
    registry,
    resolve_layers,
    set_module,
    spec_from_json,
    unregister,
)

__all__ = [
    "LAYER_DEFAULT",
    "Context",
    "GlobalSearch",
    "LayerMap",
    "LayerSearch",
    "RebuildableModule",
    "SearchSettings",
    "SpecError",
    "Technique",
    "TechniqueSpec",
    "WeightMask",
    "apply_spec",
    "base_type",
    "get",
    "layers_of",
    "module_types",
    "rebuildable",
    "register",
    "registry",
    "unregister",
    "resolve_layers",
    "set_module",
    "spec_from_json",
]

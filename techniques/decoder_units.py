"""Removing whole units from decoder modules — key/value groups from attention, channels from feed-forward layers —
shared by `decoder_heads` and `decoder_ffn`: slicing Linear/Conv1D layers, importance, how many units each module
keeps (per layer or uniform), and the apply loop.

Decisions:
- Layers are sliced by layout (new Linear/Conv1D modules holding the kept rows and columns), not through
  Torch-Pruning's dependency graph: grouped-query attention couples a key/value head to `rep` query heads through
  `repeat_kv`, an expand the graph does not see as a channel coupling; GPT-2's c_attn holds three blocks in one
  layer; and a decoder's couplings are fixed by its layout. Tests check the kept rows equal the original weights.
- Importance `magnitude`: the group L2 magnitude head and channel pruning use (Torch-Pruning's MagnitudeImportance,
  p=2): the sum of squared weights in every row and column a unit owns. `activation` (calibration data): Wanda's
  |W|·‖X‖ (Sun et al. 2023) in its structured form (Wanda-sp, An et al. 2024, FLAP): Σ over a unit's input channels
  c of the consuming layer (o_proj, down_proj, c_proj) of ‖W[:, c]‖₂ · ‖X_c‖₂ over the calibration tokens.
  The lowest-scoring units go, ties to the lower index; at least one unit always stays.
- `uniform`: every module of the model this technique handles keeps the same count, so one transformers config
  (one head count, one FFN width) describes the result. The count is the model-wide mean of what the per-layer
  ratios leave (a module no key addresses keeps all), rounded up, and at most the smallest module's: the model never
  loses more units in total than the ratios ask for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from techniques._base import (
    LAYER_DEFAULT,
    Context,
    LayerMap,
    LayerSearch,
    SearchSettings,
    SpecError,
    Technique,
    TechniqueSpec,
    check_range,
    is_number,
    layers_of,
    register,
    resolve_layers,
    set_module,
)
from techniques.decoder_layout import sync_config, widths
from techniques.head_pruning import heads_to_remove
from techniques.tools.inputs import call_model, output_tensors, to_device
from techniques.tools.tracing import Traced, check_outputs

IMPORTANCES = ("activation", "magnitude")
MAX_RATIO = 0.9  # never every unit: at least one stays


def check_ratios(spec: TechniqueSpec, setting: str) -> None:
    """SpecError unless every per-layer value of `setting` is a finite number in [0, MAX_RATIO]."""
    for key, value in getattr(spec, setting).entries:
        check_range(spec.technique, setting, value, 0.0, MAX_RATIO, layer=None if key == LAYER_DEFAULT else key)


def check_spec(spec: TechniqueSpec, setting: str, importance: Any, uniform: Any) -> None:
    """SpecError unless the ratios are in range, `importance` is a known name and `uniform` a bool."""
    check_ratios(spec, setting)
    technique = spec.technique
    if not isinstance(importance, str) or importance not in IMPORTANCES:
        raise SpecError(f"{technique}: importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    if not isinstance(uniform, bool):
        raise SpecError(f"{technique}: uniform must be true or false, got {uniform!r}")


# --------------------------------------------------------------------------- slicing


def matrix(layer: nn.Module) -> torch.Tensor:
    """A Linear's or Conv1D's weight as (outputs, inputs)."""
    weight = cast(torch.Tensor, layer.weight)
    return weight if type(layer) is nn.Linear else weight.t()


def sliced(layer: nn.Module, rows: Sequence[int] | None = None, cols: Sequence[int] | None = None) -> nn.Module:
    """A new layer of the same type holding the kept output `rows` and input `cols` (None: all), bias included."""
    weight, bias = matrix(layer).detach(), cast(torch.Tensor | None, layer.bias)
    if rows is not None:
        weight = weight[torch.as_tensor(rows, device=weight.device)]
        bias = None if bias is None else bias.detach()[torch.as_tensor(rows, device=weight.device)]
    if cols is not None:
        weight = weight[:, torch.as_tensor(cols, device=weight.device)]
    outputs, inputs = weight.shape
    with torch.device("meta"):
        new = (
            nn.Linear(inputs, outputs, bias=bias is not None)
            if type(layer) is nn.Linear
            else cast(Any, type(layer))(outputs, inputs)
        )
    stored = weight if type(layer) is nn.Linear else weight.t()
    new.weight = nn.Parameter(stored.clone().contiguous(), requires_grad=bool(cast(Any, layer).weight.requires_grad))
    if bias is not None:
        new.bias = nn.Parameter(bias.clone().contiguous(), requires_grad=bool(cast(Any, layer).bias.requires_grad))
    return new.train(layer.training)


def unit_rows(total: int, units: int, blocks: int, kept: Sequence[int]) -> list[int]:
    """Row (or column) indices of the kept units in a layer whose `total` rows are `blocks` blocks of `units`
    equal runs (GPT-2's c_attn: query, key, value blocks of heads)."""
    per = total // (blocks * units)
    return [b * units * per + u * per + i for b in range(blocks) for u in kept for i in range(per)]


# --------------------------------------------------------------------------- importance


def run_calibration(model: nn.Module, ctx: Context, technique: str, handles: Sequence[RemovableHandle]) -> None:
    """Run the model on every calibration batch without gradients (hooks collect what they need), then remove
    the hooks `handles`."""
    try:
        if ctx.calibration is None:
            raise SpecError(f"{technique}: this importance needs calibration data; the context has none")
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in ctx.calibration():
                call_model(model, to_device(batch, device))
    finally:
        for handle in handles:
            handle.remove()


def input_norms(model: nn.Module, layers: Sequence[nn.Module], ctx: Context, technique: str) -> list[torch.Tensor]:
    """‖X_c‖₂ over every calibration token of each layer's input channels c."""
    sums = [torch.zeros(widths(layer)[1], dtype=torch.float64) for layer in layers]

    def hook(index: int) -> Callable[..., None]:
        def record(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            sums[index] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0).cpu()

        return record

    run_calibration(model, ctx, technique, [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)])
    return [s.sqrt() for s in sums]


def magnitude(module: nn.Module, layout: Any) -> torch.Tensor:
    """Each unit's sum of squared weights over its rows in the input projections and its columns in the output."""
    scores = torch.zeros(layout.units, dtype=torch.float64)
    for name in layout.inputs:
        rows = matrix(getattr(module, name)).detach().double().pow(2).sum(1).cpu()
        scores += rows.view(layout.blocks, layout.units, -1).sum(dim=(0, 2))
    cols = matrix(getattr(module, layout.output)).detach().double().pow(2).sum(0).cpu()
    return scores + cols.view(layout.units, -1).sum(1)


def activation(module: nn.Module, layout: Any, norms: torch.Tensor) -> torch.Tensor:
    """Each unit's Σ_c ‖W_out[:, c]‖₂ · ‖X_c‖₂ over the output layer's input channels it owns."""
    columns = matrix(getattr(module, layout.output)).detach().double().norm(dim=0).cpu()
    return (columns * norms).view(layout.units, -1).sum(1)


# --------------------------------------------------------------------------- how many each module keeps


def kept_counts(sizes: dict[str, int], removals: dict[str, int], uniform: bool) -> dict[str, int]:
    """Units each module keeps: its size less its removal, or with `uniform` one count for all (module docstring)."""
    kept = {name: size - removals.get(name, 0) for name, size in sizes.items()}
    if not uniform or not kept:
        return kept
    count = min(math.ceil(sum(kept.values()) / len(kept)), min(sizes.values()))
    return dict.fromkeys(sizes, count)


def keep_order(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring unit indices, ascending (the lowest go first, ties to the lower index)."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[len(scores) - keep :].tolist())


@dataclass(frozen=True)
class Units:
    """What one technique removes: its name, the noun for its units, its spec's per-layer setting, the registry's
    layer types and the layout reader (`attention_of`, `mlp_of`)."""

    technique: str
    noun: str
    setting: str
    layer_types: tuple[type[nn.Module], ...]
    layout: Callable[[nn.Module], Any]

    def apply(self, model: nn.Module, spec: Any, ctx: Context) -> nn.Module:
        """Remove the least important units of the modules `spec` addresses (its ratios, importance, uniform)."""
        return prune(model, getattr(spec, self.setting), spec.importance, spec.uniform, ctx, self)

    def register(self, spec_type: type[TechniqueSpec], *, stage: int, title: str) -> Technique:
        """Register the technique, offering the search the ratios 0 (off), 0.25 and 0.5 per module."""
        search = LayerSearch(self.setting, choices=(0.0, 0.25, 0.5), off=0.0, title=title, eligible=self.prunable)
        settings = SearchSettings(search)
        return register(Technique(self.technique, spec_type, self.apply, self.layer_types, stage, settings, True))

    def prunable(self, layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
        """The modules a search prunes: those with a handled layout and two units or more."""
        return [name for name, module in layers if (layout := self.layout(module)) is not None and layout.units > 1]


def _cut(model: nn.Module, name: str, module: nn.Module, layout: Any, kept: list[int]) -> None:
    for child in layout.inputs:
        layer = getattr(module, child)
        rows = unit_rows(widths(layer)[0], layout.units, layout.blocks, kept)
        set_module(model, f"{name}.{child}", sliced(layer, rows=rows))
    output = getattr(module, layout.output)
    set_module(
        model, f"{name}.{layout.output}", sliced(output, cols=unit_rows(widths(output)[1], layout.units, 1, kept))
    )
    for key, value in layout.attributes(len(kept)).items():
        if isinstance(vars(module).get(key), int):
            setattr(module, key, value)


def _scores(model: nn.Module, found: list[tuple[str, nn.Module, Any]], importance: str, ctx: Context, units: Units):
    if importance == "magnitude":
        return [magnitude(module, layout) for _, module, layout in found]
    outputs = [getattr(module, layout.output) for _, module, layout in found]
    norms = input_norms(model, outputs, ctx, units.technique)
    return [activation(module, layout, n) for (_, module, layout), n in zip(found, norms, strict=True)]


def _plan(model: nn.Module, ratios: LayerMap, uniform: bool, ctx: Context, units: Units) -> dict[str, int]:
    """Units each handled module keeps (only those that shrink)."""
    handled = {name: units.layout(module) for name, module in layers_of(model, units.layer_types)}
    removals = {}
    for name, _, ratio in resolve_layers(model, ratios, units.layer_types, units.technique):
        layout = handled.get(name)
        if layout is None:
            if is_number(ratio) and ratio > 0:
                ctx.note(units.technique, name, f"kept all {units.noun}: not a decoder layout this technique handles")
            continue
        removals[name] = heads_to_remove(layout.units, float(ratio))
    sizes = {name: layout.units for name, layout in handled.items() if layout is not None}
    kept = kept_counts(sizes, removals, uniform)
    return {name: count for name, count in kept.items() if count < sizes[name]}


def refuse_parametrized(model: nn.Module, technique: str) -> None:
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise SpecError(f"{technique}: the model has parametrised layers; it must run before them")


def pruning(model: nn.Module, technique: str, ctx: Context, work: Callable[[nn.Module], None]) -> nn.Module:
    """Run `work(model)` in eval mode, then set the config's global shape fields (`sync_config`) and check the model
    still returns outputs of the same shapes on the example inputs; the training mode is restored."""
    training = model.training
    try:
        model.eval()
        example = to_device(ctx.example_inputs, next(model.parameters()).device)
        with torch.no_grad():
            shapes = [t.shape for t in output_tensors(call_model(model, example))]
        work(model)
        changed = sync_config(model)
        if changed:
            ctx.note(technique, None, f"config set to {changed}", config=changed)
        check_outputs(model, Traced(None, example, set(), shapes), technique)
    finally:
        model.train(training)
    return model


def prune(model: nn.Module, ratios: LayerMap, importance: str, uniform: bool, ctx: Context, units: Units) -> nn.Module:
    """Remove the lowest-importance units of every module the plan shrinks, in place."""
    refuse_parametrized(model, units.technique)
    plan = _plan(model, ratios, uniform, ctx, units)
    if not plan:
        ctx.note(units.technique, None, f"no module loses {units.noun} at these settings; nothing pruned")
        return model
    return pruning(model, units.technique, ctx, lambda m: _prune(m, plan, importance, ctx, units))


def _prune(model: nn.Module, plan: dict[str, int], importance: str, ctx: Context, units: Units) -> None:
    modules = dict(model.named_modules())
    found = [(name, modules[name], units.layout(modules[name])) for name in plan]
    for (name, module, layout), scores in zip(found, _scores(model, found, importance, ctx, units), strict=True):
        kept = keep_order(scores, plan[name])
        _cut(model, name, module, layout, kept)
        message = f"kept {len(kept)} of {layout.units} {units.noun}"
        ctx.note(units.technique, name, message, kept=kept, units=layout.units)

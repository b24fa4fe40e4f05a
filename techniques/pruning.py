"""Unstructured magnitude pruning: zero the smallest |w| of each layer (or of all layers together) and keep
them at zero through fine-tuning with a `WeightMask` parametrisation; finalize bakes and packs them.
`criterion="random"` zeros a seeded random subset instead: the textbook baseline for magnitude pruning."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from techniques._base import (
    LAYER_DEFAULT,
    Context,
    LayerMap,
    LayerSearch,
    SearchSettings,
    SpecError,
    Technique,
    TechniqueSpec,
    WeightMask,
    check_range,
    parametrizations_of,
    register,
    resolve_layers,
    weight_of,
)

NAME = "unstructured_pruning"
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
SCOPES = ("layer", "global")
CRITERIA = ("magnitude", "random")
MAX_SPARSITY = 0.99  # a layer keeps at least 1% of its weights; 1.0 would zero it whole


@dataclass(frozen=True)
class UnstructuredPruningSpec(TechniqueSpec):
    """Per-layer fraction of weights to zero by magnitude (0 leaves a layer alone).

    `scope="layer"`: each layer prunes its own smallest weights to its own sparsity.
    `scope="global"`: each addressed layer adds `sparsity × its weight count` to one budget, and the budget
    is spent on the smallest |w| across all addressed layers together, so a scalar `s` means "a fraction s
    of all addressed weights" and layers end up with different sparsities (possibly a whole layer).
    `criterion="random"` ranks weights by seeded uniform noise (`ctx.seed`) instead of |w|.

    Valid values: each sparsity a finite number in [0, MAX_SPARSITY] = [0, 0.99] (an int 0 counts as 0.0; bools,
    None, nan and inf are rejected).
    """

    technique: ClassVar[str] = NAME

    sparsity: LayerMap
    scope: str = "layer"
    criterion: str = "magnitude"

    def validate(self) -> None:
        for key, value in self.sparsity.entries:
            layer = None if key == LAYER_DEFAULT else key
            check_range(NAME, "sparsity", value, 0.0, MAX_SPARSITY, layer=layer)
        if self.scope not in SCOPES:
            raise SpecError(f"{NAME}: scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.criterion not in CRITERIA:
            raise SpecError(f"{NAME}: criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")


def pruned_count(sparsity: float, numel: int) -> int:
    """How many of `numel` weights a sparsity asks to prune (nearest whole number)."""
    return min(numel, math.floor(sparsity * numel + 0.5))


def smallest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean keep-mask (shape of `scores`) that drops the `count` smallest scores.

    Ties break by position (stable sort), so the mask is deterministic for equal magnitudes.
    """
    flat = scores.flatten()
    order = torch.argsort(flat, stable=True)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:count]] = False
    return keep.view_as(scores)


def existing_mask(module: nn.Module) -> WeightMask | None:
    """The WeightMask already parametrising `module.weight`, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for parametrization in parametrizations_of(module, "weight"):
        if isinstance(parametrization, WeightMask):
            return parametrization
    return None


def attach_mask(module: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """Enforce `keep` on `module.weight` (merging with an earlier mask); return the mask now in force."""
    current = existing_mask(module)
    if current is not None:
        current.mask &= keep.to(current.mask.device)
        return current.mask
    mask = WeightMask(keep)
    parametrize.register_parametrization(module, "weight", mask)
    return mask.mask


def _scores(weights: list[torch.Tensor], criterion: str, seed: int) -> list[torch.Tensor]:
    """What each weight is ranked by: |w|, or uniform noise drawn on the CPU from `seed` (device-independent)."""
    if criterion == "magnitude":
        return [w.detach().abs().float() for w in weights]
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(w.shape, generator=generator).to(w.device) for w in weights]


def _masks(scores: list[torch.Tensor], counts: list[int], scope: str) -> list[torch.Tensor]:
    """Keep-masks for each score tensor: per layer, or one ranking over all of them."""
    if scope == "layer":
        return [smallest_mask(s, k) for s, k in zip(scores, counts, strict=True)]
    keep = smallest_mask(torch.cat([s.flatten().cpu() for s in scores]), sum(counts))
    parts = keep.split([s.numel() for s in scores])
    return [part.view_as(s).to(s.device) for part, s in zip(parts, scores, strict=True)]


def apply(model: nn.Module, spec: UnstructuredPruningSpec, ctx: Context) -> nn.Module:
    """Mask the smallest-magnitude weights of every addressed layer; the model keeps its architecture."""
    targets = [
        (name, module, float(value))
        for name, module, value in resolve_layers(model, spec.sparsity, LAYER_TYPES, NAME)
        if value > 0
    ]
    if not targets:
        ctx.note(NAME, None, "no layer asked for a sparsity above 0; nothing pruned")
        return model
    with torch.no_grad():
        weights = [weight_of(module) for _, module, _ in targets]
        counts = [pruned_count(value, w.numel()) for (_, _, value), w in zip(targets, weights, strict=True)]
        masks = _masks(_scores(weights, spec.criterion, ctx.seed), counts, spec.scope)
        pruned = total = 0
        for (name, module, value), keep in zip(targets, masks, strict=True):
            in_force = attach_mask(module, keep)
            zeros = int(in_force.numel() - in_force.sum())
            pruned, total = pruned + zeros, total + in_force.numel()
            achieved = zeros / in_force.numel()
            ctx.note(NAME, name, f"{achieved:.1%} of weights pruned", requested=value, sparsity=achieved)
    if spec.scope == "global":
        ctx.note(NAME, None, f"{pruned / total:.1%} of addressed weights pruned globally", sparsity=pruned / total)
    return model


register(
    Technique(
        name=NAME,
        spec_type=UnstructuredPruningSpec,
        apply=apply,
        layer_types=LAYER_TYPES,
        stage=30,
        search=SearchSettings(
            per_layer=LayerSearch(
                setting="sparsity",
                choices=(0.0, 0.5, 0.7, 0.8, 0.9, 0.95),  # fraction of weights zeroed
                off=0.0,
                title="unstructured sparsity",
            )
        ),
    )
)

"""Depth pruning for decoder language models: whole decoder blocks leave the stack (`model.layers`,
`transformer.h`), the least important first, ranked by ShortGPT's Block Influence on calibration data.

Block Influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect", arXiv:2403.03853): BI_i = 1 − mean over calibration tokens t of cos(x_i,t, x_i+1,t), x_i the hidden
state entering block i and x_i+1 the one leaving it; a block that barely turns its input scores low and goes first
(ties to the lower index). Padding positions count like any other token.

Decisions:
- The setting is per stack (the ModuleList of blocks, one in a causal LM): the fraction of its blocks removed,
  floor(ratio × blocks), at least one block stays. Stage 25, after the width techniques (heads 15/16, FFN 20/21),
  so their per-layer keys address the blocks by their original names; distillation (50) then fine-tunes.
- The KV cache is indexed by each attention's `layer_idx`: every module of a kept block gets its new position. The
  stack's `source_layers` attribute keeps each block's index in the original model (checkpoints record it as a
  `blocks` entry), the config's `layer_types` (Qwen2: one entry per block) keeps the kept blocks' entries and
  `num_hidden_layers` (GPT-2: `n_layer`) the new count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from techniques._base import (
    Context,
    LayerMap,
    LayerSearch,
    SearchSettings,
    Technique,
    TechniqueSpec,
    register,
    resolve_layers,
    set_module,
)
from techniques.decoder_layout import SOURCE_LAYERS, LayoutTypes, is_decoder_stack, model_config
from techniques.decoder_units import check_ratios, keep_order, pruning, refuse_parametrized, run_calibration
from techniques.head_pruning import heads_to_remove

NAME = "depth_pruning"


class DecoderStack(nn.Module):
    """Stands, in the registry's layer types and in messages, for a ModuleList of decoder blocks."""


LAYER_TYPES: tuple[type[nn.Module], ...] = LayoutTypes(DecoderStack, lambda cls: cls is nn.ModuleList)


@dataclass(frozen=True)
class DepthPruningSpec(TechniqueSpec):
    """Per decoder stack (`model.layers`, `transformer.h`), the fraction of its blocks to remove, lowest Block
    Influence first; needs calibration data. Valid values: each ratio a finite number in [0, 0.9]."""

    technique: ClassVar[str] = NAME

    depth_ratio: LayerMap

    def validate(self) -> None:
        check_ratios(self, "depth_ratio")


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


def block_influence(model: nn.Module, stacks: Sequence[nn.ModuleList], ctx: Context) -> list[torch.Tensor]:
    """Each block's Block Influence, 1 − mean cosine between its input and output hidden states (a block the
    calibration data never reach scores +inf: nothing says it is redundant)."""
    totals = [torch.zeros(len(stack), dtype=torch.float64) for stack in stacks]
    counts = [torch.zeros(len(stack), dtype=torch.float64) for stack in stacks]

    def hook(s: int, b: int) -> Callable[..., None]:
        def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = _hidden(args[0] if args else kwargs["hidden_states"]).detach().double()
            cos = nn.functional.cosine_similarity(x, _hidden(output).detach().double(), dim=-1)
            totals[s][b] += (1 - cos).sum().cpu()
            counts[s][b] += cos.numel()

        return record

    handles = [
        block.register_forward_hook(hook(s, b), with_kwargs=True)
        for s, stack in enumerate(stacks)
        for b, block in enumerate(stack)
    ]
    run_calibration(model, ctx, NAME, handles)
    return [torch.where(n > 0, t / n.clamp(min=1), torch.inf) for t, n in zip(totals, counts, strict=True)]


def keep_blocks(model: nn.Module, name: str, kept: list[int]) -> nn.ModuleList:
    """Replace stack `name` by its blocks `kept` (positions), renumber their `layer_idx`, record where each came
    from, and keep the config's per-block `layer_types` in step."""
    stack = cast(nn.ModuleList, model.get_submodule(name))
    sources = getattr(stack, SOURCE_LAYERS, None) or tuple(range(len(stack)))
    new = nn.ModuleList([stack[i] for i in kept])
    setattr(new, SOURCE_LAYERS, tuple(sources[i] for i in kept))
    set_module(model, name, new)
    for position, block in enumerate(new):
        for module in block.modules():
            if isinstance(vars(module).get("layer_idx"), int):
                cast(Any, module).layer_idx = position
    found = model_config(model)
    types = getattr(found[1], "layer_types", None) if found else None
    if found and isinstance(types, list | tuple) and len(types) == len(stack):
        found[1].layer_types = [types[i] for i in kept]
    return new


def _targets(model: nn.Module, spec: DepthPruningSpec, ctx: Context) -> list[tuple[str, nn.ModuleList, int]]:
    targets = []
    for name, stack, ratio in resolve_layers(model, spec.depth_ratio, LAYER_TYPES, NAME):
        if not is_decoder_stack(stack):
            if ratio > 0:
                ctx.note(NAME, name, "kept every block: not a stack of decoder blocks this technique handles")
            continue
        blocks = cast(nn.ModuleList, stack)
        drop = heads_to_remove(len(blocks), float(ratio))
        if drop:
            targets.append((name, blocks, drop))
    return targets


def apply(model: nn.Module, spec: DepthPruningSpec, ctx: Context) -> nn.Module:
    """Remove the lowest-influence blocks of every addressed decoder stack, in place."""
    refuse_parametrized(model, NAME)
    targets = _targets(model, spec, ctx)
    if not targets:
        ctx.note(NAME, None, "no stack loses a block at these ratios; nothing pruned")
        return model
    return pruning(model, NAME, ctx, lambda m: _prune(m, targets, ctx))


def _prune(model: nn.Module, targets: list[tuple[str, nn.ModuleList, int]], ctx: Context) -> None:
    scores = block_influence(model, [stack for _, stack, _ in targets], ctx)
    for (name, stack, drop), influence in zip(targets, scores, strict=True):
        kept = keep_order(influence, len(stack) - drop)
        dropped = [i for i in range(len(stack)) if i not in kept]
        keep_blocks(model, name, kept)
        rounded = [round(float(v), 6) for v in influence]
        ctx.note(NAME, name, f"dropped blocks {dropped} of {len(stack)}", dropped=dropped, influence=rounded)


def prunable(layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Decoder stacks of two blocks or more."""
    return [name for name, module in layers if is_decoder_stack(module) and len(cast(nn.ModuleList, module)) > 1]


register(
    Technique(
        name=NAME,
        spec_type=DepthPruningSpec,
        apply=apply,
        layer_types=LAYER_TYPES,
        stage=25,
        search=SearchSettings(
            per_layer=LayerSearch(
                setting="depth_ratio",
                choices=(0.0, 0.125, 0.25),
                off=0.0,
                title="decoder blocks removed",
                eligible=prunable,
            )
        ),
        structural=True,
    )
)

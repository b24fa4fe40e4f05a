"""Structured channel pruning with Torch-Pruning's dependency graph: whole output channels are removed, and
every coupled layer (BatchNorm, the next layer's inputs, both sides of a residual add) shrinks with them,
so the model is physically smaller and cheaper, not just sparser.

Decisions (transformers):
- The query, key, value and output projections of an attention module are never cut here: their channels are
  heads, which `head_pruning` removes whole; a plain channel cut breaks `view(..., heads, head_dim)`. A group
  holding one of them is kept, with a note, whatever the policy says; the search never offers them.
- A group coupled to an embedding is the hidden size (the residual stream every block, LayerNorm and embedding
  shares); it is kept, with a note. What a search offers in a transformer is the feed-forward intermediate
  width (`intermediate.dense`: its output channels and `output.dense`'s inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
    check_range,
    is_integer,
    register,
    resolve_layers,
)
from techniques.decoder_layout import decoder_stacks
from techniques.head_pruning import attention_layer_names, projection_layers
from techniques.tools.tracing import Traced, check_outputs, trace

NAME = "structured_pruning"
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
IMPORTANCES = {"l1": 1, "l2": 2}
MAX_RATIO = 0.9  # every pruned group keeps at least a tenth of its channels
MAX_ROUND_TO = 4096  # a channel multiple wider than any real layer; larger values could only mean "keep all"


@dataclass(frozen=True)
class StructuredPruningSpec(TechniqueSpec):
    """Per-layer fraction of output channels (features) to remove, ranked by the group's L1/L2 norm.

    Layers coupled by the dependency graph (e.g. the convolutions feeding one residual add) must keep the
    same channels, so such a group is pruned by the smallest ratio among its layers, a layer no key
    addresses counting as 0: no layer ever loses more channels than it asked for. Layers whose outputs
    are the model's output are never pruned. `round_to` rounds each group's kept channels up to a multiple.
    A layer low-rank factored into `name.0`, `name.1` inherits `name`'s ratio in each factor, so the inner
    rank shrinks with the output channels.

    Valid values: each ratio a finite number in [0, MAX_RATIO] = [0, 0.9] (an int 0 counts as 0.0; bools, None,
    nan and inf are rejected); `importance` one of l1, l2; `round_to` null or an integer (not a float such
    as 8.0) in [1, MAX_ROUND_TO] = [1, 4096].
    """

    technique: ClassVar[str] = NAME

    ratio: LayerMap
    importance: str = "l2"
    round_to: int | None = None

    def validate(self) -> None:
        for key, value in self.ratio.entries:
            layer = None if key == LAYER_DEFAULT else key
            check_range(NAME, "ratio", value, 0.0, MAX_RATIO, layer=layer)
        if not isinstance(self.importance, str) or self.importance not in IMPORTANCES:
            raise SpecError(f"{NAME}: importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        size = self.round_to
        if size is not None and not (is_integer(size) and 1 <= size <= MAX_ROUND_TO):
            raise SpecError(f"{NAME}: round_to must be an integer in [1, {MAX_ROUND_TO}] or null, got {size!r}")


@dataclass(frozen=True)
class _Cut:
    """One planned group prune: the root layer, its pruning function and the channel indices to drop."""

    root: nn.Module
    handler: Any
    drop: list[int]


def kept_channels(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels left after removing `ratio` of `channels` (rounded down), at least one, then rounded up."""
    keep = max(1, channels - math.floor(ratio * channels + 1e-9))
    if round_to:
        keep = min(channels, math.ceil(keep / round_to) * round_to)
    return keep


def _producers(graph: Any, group: Any) -> list[nn.Module]:
    """Conv/Linear layers whose output channels the group removes."""
    return [
        dep.target.module
        for dep, _ in group
        if graph.is_out_channel_pruning_fn(dep.handler) and type(dep.target.module) in LAYER_TYPES
    ]


def _out_of_range(graph: Any, group: Any) -> bool:
    """Whether the graph maps the group's channels past a layer's width (Torch-Pruning 1.6.1 does, e.g., for a
    concatenation of flattened convolution features with a Linear's features): pruning it would fail or cut
    the wrong channels."""
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, nn.Module) or next(module.parameters(recurse=False), None) is None or not idxs:
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        channels = graph.get_out_channels(dep.target) if out else graph.get_in_channels(dep.target)
        if channels is not None and max(idxs) >= channels:
            return True
    return False


def _unprunable(graph: Any, group: Any, output_fns: set[Any], attention: dict[nn.Module, str]) -> str | None:
    """Why the group's channels must stay: they are a model output (a cut node yields an output tensor or
    has no consumer), attention heads (head pruning's), the hidden size (coupled to an embedding or feeding an
    attention's projections), they pass through a grouped (not depthwise) convolution, whose channels move in
    blocks, or the graph maps them inconsistently."""
    for dep, _ in group:
        node = dep.target
        if graph.is_out_channel_pruning_fn(dep.handler) and (not node.outputs or node.grad_fn in output_fns):
            return "they are the model's output"
    modules = [(dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)) for dep, _ in group]
    heads = sorted({attention[m] for m, out in modules if out and m in attention})
    if heads:
        return f"they are the attention heads of {', '.join(heads)}; head_pruning removes whole heads"
    if any(isinstance(m, nn.Embedding) for m, _ in modules):
        return "they are the hidden size, coupled to an embedding and every residual connection"
    feeds = sorted({attention[m] for m, _ in modules if m in attention})
    if feeds:
        return f"they are the hidden size, read by the query, key and value of {', '.join(feeds)}"
    for module, _ in modules:
        if isinstance(module, nn.Conv2d) and 1 < module.groups < module.out_channels:
            return "they pass through a grouped convolution"
    if _out_of_range(graph, group):
        return "the dependency graph maps them past a layer's width (e.g. through a concatenation)"
    return None


def _plan(
    model: nn.Module, traced: Traced, spec: StructuredPruningSpec, ratios: dict[nn.Module, float], ctx: Context
) -> list[_Cut]:
    """Decide every group's channels to drop before pruning any, so importance sees the original weights."""
    import torch_pruning as tp

    graph, attention = traced.graph, projection_layers(model)
    names = {module: name for name, module in model.named_modules()}
    scorer = tp.importance.MagnitudeImportance(p=IMPORTANCES[spec.importance], group_reduction="mean", normalizer=None)
    cuts = []
    for group in graph.get_all_groups(root_module_types=LAYER_TYPES):
        producers = _producers(graph, group)
        addressed = [names[m] for m in producers if ratios.get(m, 0.0) > 0]
        if not addressed:
            continue
        reason = _unprunable(graph, group, traced.output_fns, attention)
        if reason:
            for name in addressed:
                ctx.note(NAME, name, f"kept all output channels: {reason}")
            continue
        ratio = min(ratios.get(m, 0.0) for m in producers)  # a coupled layer no key addresses counts as 0
        if ratio <= 0:
            continue
        if len(producers) > 1:
            coupled = ", ".join(names[m] for m in producers)
            for name in addressed:
                ctx.note(NAME, name, f"coupled with {coupled}: the group is pruned by {ratio}", ratio=ratio)
        root, handler = group[0].dep.target.module, group[0].dep.handler
        channels = graph.get_out_channels(root)
        keep = kept_channels(channels, ratio, spec.round_to)
        scores = scorer(group)
        if keep == channels or scores is None:
            continue
        order = torch.argsort(scores.detach().float().cpu(), stable=True)
        cuts.append(_Cut(root, handler, sorted(order[: channels - keep].tolist())))
    return cuts


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shapes of every layer, to report what changed."""
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }


def _prune(model: nn.Module, spec: StructuredPruningSpec, ratios: dict[nn.Module, float], ctx: Context) -> None:
    """Trace the dependency graph on the example inputs, prune every planned group and check the output."""
    before = _shapes(model)
    traced = trace(model, ctx)
    for cut in _plan(model, traced, spec, ratios, ctx):
        traced.graph.get_pruning_group(cut.root, cut.handler, idxs=cut.drop).prune()
    check_outputs(model, traced, NAME)
    for name, shape in _shapes(model).items():
        if shape != before[name]:
            ctx.note(NAME, name, f"weight {list(before[name])} -> {list(shape)}", shape=list(shape))


def apply(model: nn.Module, spec: StructuredPruningSpec, ctx: Context) -> nn.Module:
    """Remove the least important output channels of every addressed layer group, in place."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise SpecError(f"{NAME}: the model has parametrised layers; structured pruning must run before them")
    if decoder_stacks(model):
        raise SpecError(
            f"{NAME}: a transformers decoder's widths are pruned by ffn_pruning, decoder_head_pruning and "
            "depth_pruning (Torch-Pruning's grouping of its residual stream does not finish in useful time)"
        )
    ratios = {module: float(value) for _, module, value in resolve_layers(model, spec.ratio, LAYER_TYPES, NAME)}
    if not any(value > 0 for value in ratios.values()):
        ctx.note(NAME, None, "no layer asked for a ratio above 0; nothing pruned")
        return model
    training = model.training
    try:
        _prune(model.eval(), spec, ratios, ctx)
    finally:
        model.train(training)
    return model


def all_but_output(layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """The layers a search prunes: all but the last, whose features are the model's output; in a transformer
    also none of an attention's projections (head pruning's) and none writing the hidden size (the residual
    stream), which leaves the feed-forward intermediate layers; none of a decoder's gated feed-forward
    (`gate_proj`, `up_proj` and `down_proj` siblings: ffn_pruning's, and `apply` refuses decoders)."""
    attention, hidden = attention_layer_names(layers)
    gated = _gated_feed_forward([name for name, _ in layers])
    return [
        name
        for name, module in layers[:-1]
        if name not in attention
        and name not in gated
        and (hidden is None or getattr(module, "out_features", None) != hidden)
    ]


GATED = ("gate_proj", "up_proj", "down_proj")  # a Llama-style gated feed-forward's projections


def _gated_feed_forward(names: Sequence[str]) -> set[str]:
    """The names of layers that, with their siblings, make a gated feed-forward."""
    present, found = set(names), set()
    for name in names:
        parent, _, leaf = name.rpartition(".")
        siblings = {f"{parent}.{part}" if parent else part for part in GATED}
        if leaf == GATED[0] and siblings <= present:
            found |= siblings
    return found


register(
    Technique(
        name=NAME,
        spec_type=StructuredPruningSpec,
        apply=apply,
        layer_types=LAYER_TYPES,
        stage=20,
        search=SearchSettings(
            per_layer=LayerSearch(
                setting="ratio",
                choices=(0.0, 0.125, 0.25, 0.375, 0.5),  # fraction of output channels removed
                off=0.0,
                title="structured pruning ratio",
                eligible=all_but_output,
            )
        ),
        structural=True,
    )
)

"""Attention head pruning with Torch-Pruning's dependency graph: whole heads leave the query, key and value
projections, their columns leave the output projection, and the attention module's head count follows, so
the model really shrinks while the hidden size (the residual stream, LayerNorms, embeddings) stays as it was.

Decisions:
- An attention module is recognised by what it holds, not by its class name: an integer head count
  (`num_attention_heads`, `num_heads` or `n_heads`), an integer head size (`attention_head_size`, `head_dim`
  or `head_size`) and query/key/value projections (`query`/`key`/`value`, `q_proj`/`k_proj`/`v_proj` or
  `q_lin`/`k_lin`/`v_lin`), each a Linear (or a low-rank factored sequence ending in one) with heads × head
  size outputs. Hugging Face's BERT-style self-attention (BertSelfAttention, and the RoBERTa, ELECTRA, ViT …
  copies of it) fits. Grouped-query attention (fewer key/value heads) and GPT-2's fused attention do not: they are
  left alone, with a note naming `decoder_head_pruning`, which prunes them by whole key/value groups.
- The registry matches layers by exact type; `LAYER_TYPES` holds a stand-in class (`MultiHeadAttention`, the
  name messages show) and admits every class whose `__init__` assigns a head count and a query/key/value triple,
  so `import techniques` never imports transformers. Each module is then checked on the instance.
- The dependency graph, traced on the example inputs, finds the layers coupled to a head's channels; heads are
  removed only when that group is exactly the three projections (output channels) and one output projection
  (input columns). Anything else (a residual, a LayerNorm, an embedding) would change the hidden size, so such
  an attention module is left alone, with a note.
- Importance is Torch-Pruning's group L2 magnitude per channel (query, key and value rows and output-projection
  columns), averaged over each head's channels, as its BasePruner does with `num_heads`; the lowest-scoring
  heads go, ties to the lower index: deterministic. At least one head always stays.
- After pruning, the head count and `all_head_size` are updated; the head size is unchanged. The transformers
  config object keeps its original head count (BERT's forward reads the module's attributes, not the config),
  and checkpoints record the changed attributes (`orchestrator.artifacts.structure`).
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
    register,
    resolve_layers,
)
from techniques.decoder_layout import attention_of, init_names
from techniques.tools.tracing import Traced, check_outputs, trace

NAME = "head_pruning"
MAX_RATIO = 0.9  # never every head; an attention module always keeps at least one
HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads")
HEAD_SIZES = ("attention_head_size", "head_dim", "head_size")
TOTALS = ("all_head_size",)  # attributes holding heads × head size, updated with the head count
PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "out_lin", "dense")  # children of the attention module
SIBLING_OUTPUT = "output.dense"  # BERT/ViT: the output projection is the attention's parent's `output.dense`


class MultiHeadAttention(nn.Module):
    """Stands, in the registry's layer types and in messages, for every attention module head pruning handles."""


def is_attention_class(cls: type) -> bool:
    """Whether `cls.__init__` assigns a head count and a query/key/value triple (a cheap, class-level test)."""
    names = init_names(cls)
    return bool(names & set(HEAD_COUNTS)) and any(set(triple) <= names for triple in PROJECTIONS)


class _AttentionTypes(tuple[type[nn.Module], ...]):
    """A layer-type tuple whose membership test admits every attention class (see the module docstring)."""

    def __contains__(self, item: object) -> bool:
        return isinstance(item, type) and is_attention_class(item)


LAYER_TYPES: tuple[type[nn.Module], ...] = _AttentionTypes((MultiHeadAttention,))


@dataclass(frozen=True)
class HeadPruningSpec(TechniqueSpec):
    """Per attention module, the fraction of its heads to remove: floor(head_ratio × heads), at most all but one.

    Address attention modules by name (`bert.encoder.layer.0.attention.self`), `re:` regex or `_default`.
    Valid values: each ratio a finite number in [0, MAX_RATIO] = [0, 0.9] (bools, None, nan and inf rejected).
    """

    technique: ClassVar[str] = NAME

    head_ratio: LayerMap

    def validate(self) -> None:
        for key, value in self.head_ratio.entries:
            layer = None if key == LAYER_DEFAULT else key
            check_range(NAME, "head_ratio", value, 0.0, MAX_RATIO, layer=layer)


@dataclass(frozen=True)
class Heads:
    """An attention module's layout: its head count and size, the attribute holding the count, and the Linear
    layers whose outputs are the heads' queries, keys and values."""

    count_attr: str
    count: int
    size: int
    projections: tuple[nn.Linear, nn.Linear, nn.Linear]


def _int_attr(module: nn.Module, names: Sequence[str]) -> tuple[str, int] | None:
    for name in names:
        value = vars(module).get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _last_linear(module: nn.Module | None) -> nn.Linear | None:
    """The Linear whose outputs a projection yields: the layer itself, or the last of a factored sequence."""
    if isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module if type(module) is nn.Linear else None


def heads_of(module: nn.Module) -> Heads | None:
    """The module's head layout, or None when it is not a multi-head attention this technique can prune."""
    count, size = _int_attr(module, HEAD_COUNTS), _int_attr(module, HEAD_SIZES)
    if count is None or size is None:
        return None
    children = dict(module.named_children())
    for triple in PROJECTIONS:
        q, k, v = (_last_linear(children.get(name)) for name in triple)
        if q is None or k is None or v is None:
            continue
        if all(layer.out_features == count[1] * size[1] for layer in (q, k, v)):
            return Heads(count[0], count[1], size[1], (q, k, v))
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, Heads]]:
    """Every multi-head attention module of the model this technique can prune, in model order."""
    found = []
    for name, module in model.named_modules():
        heads = heads_of(module) if name and is_attention_class(type(module)) else None
        if heads is not None:
            found.append((name, module, heads))
    return found


def projection_layers(model: nn.Module) -> dict[nn.Module, str]:
    """Every Linear inside the query/key/value projections of the model's attention modules (low-rank factors
    included) → the attention module's name."""
    members: dict[nn.Module, str] = {}
    for name, module, _ in attention_modules(model):
        for child_name, child in module.named_children():
            if any(child_name in triple for triple in PROJECTIONS):
                members.update((layer, name) for layer in child.modules() if type(layer) is nn.Linear)
    return members


def heads_to_remove(count: int, ratio: float) -> int:
    """How many of `count` heads a ratio removes: floor(ratio × count), leaving at least one head."""
    return max(0, min(count - 1, math.floor(ratio * count + 1e-9)))


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def attention_layer_names(layers: Sequence[tuple[str, nn.Module]]) -> tuple[set[str], int | None]:
    """From layer names alone (a search space never traces the model): the layers that belong to attention
    modules (query/key/value and output projections, their low-rank factors included) and the hidden size the
    queries read (None when the model has no attention)."""
    stems: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in layers:  # a factored layer `fc.0`, `fc.1` counts as `fc`
        head, _, last = name.rpartition(".")
        stems.setdefault(head if last.isdigit() and head else name, []).append((name, module))
    owned: set[str] = set()
    hidden = None
    for stem, members in stems.items():
        attention, _, role = stem.rpartition(".")
        for triple in PROJECTIONS:
            projections = [_join(attention, r) for r in triple]
            if role != triple[0] or not all(p in stems for p in projections):
                continue
            outputs = [_join(attention, child) for child in OUTPUT_PROJECTIONS]
            outputs.append(_join(attention.rpartition(".")[0], SIBLING_OUTPUT))
            for layer in [*projections, *outputs]:
                owned.update(name for name, _ in stems.get(layer, ()))
            hidden = hidden or getattr(members[0][1], "in_features", None)
    return owned, hidden


# --------------------------------------------------------------------------- pruning


_Target = tuple[str, nn.Module, Heads, int]  # an attention module to prune: name, module, layout, heads to remove


@dataclass(frozen=True)
class _Cut:
    name: str
    module: nn.Module
    heads: Heads
    drop: list[int]  # head indices


def _coupling(graph: Any, group: Any, heads: Heads, names: dict[Any, str]) -> str | None:
    """Why the heads' channels cannot go alone: the group holds more than the three projections (output
    channels) and one output projection (input columns), e.g. a residual, LayerNorm or embedding."""
    outs, ins, others = set(), set(), []
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.Module) and next(module.parameters(recurse=False), None) is None:
            continue  # an operation (reshape, transpose, attention), no weights
        if type(module) is nn.Linear and graph.is_out_channel_pruning_fn(dep.handler):
            outs.add(module)
        elif type(module) is nn.Linear and graph.is_in_channel_pruning_fn(dep.handler):
            ins.add(module)
        else:
            others.append(names.get(module, type(module).__name__))
    if others:
        return f"its heads' channels are coupled to {', '.join(sorted(set(others)))}"
    if outs != set(heads.projections) or len(ins) != 1:
        found = ", ".join(sorted(names.get(m, "?") for m in outs | ins))
        return f"its heads' channels reach {found}, not query, key, value and one output projection"
    return None


def _plan(model: nn.Module, traced: Traced, targets: list[_Target], ctx: Context) -> list[_Cut]:
    """Choose every module's heads before pruning any, scored on the original weights."""
    import torch_pruning as tp

    names: dict[Any, str] = {module: name for name, module in model.named_modules()}
    scorer = tp.importance.MagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    cuts = []
    for name, module, heads, remove in targets:
        q = heads.projections[0]
        if any(layer not in traced.graph.module2node for layer in heads.projections):
            ctx.note(NAME, name, "kept all heads: the example inputs never reach its query, key and value")
            continue
        group = traced.graph.get_pruning_group(q, tp.prune_linear_out_channels, list(range(q.out_features)))
        reason = _coupling(traced.graph, group, heads, names)
        scores = scorer(group) if reason is None else None
        if scores is None:
            ctx.note(NAME, name, f"kept all heads: {reason or 'no weights to score'}")
            continue
        per_head = scores.detach().float().cpu().view(heads.count, heads.size).mean(dim=1)
        cuts.append(_Cut(name, module, heads, sorted(torch.argsort(per_head, stable=True)[:remove].tolist())))
    return cuts


def _set_head_count(module: nn.Module, heads: Heads, count: int) -> None:
    setattr(module, heads.count_attr, count)
    for total in TOTALS:
        if isinstance(vars(module).get(total), int):
            setattr(module, total, count * heads.size)


def _prune(model: nn.Module, targets: list[_Target], ctx: Context) -> None:
    """Trace the dependency graph, remove every planned module's heads, update its head count, check the output."""
    import torch_pruning as tp

    traced = trace(model, ctx)
    for cut in _plan(model, traced, targets, ctx):
        size = cut.heads.size
        idxs = [head * size + offset for head in cut.drop for offset in range(size)]
        traced.graph.get_pruning_group(cut.heads.projections[0], tp.prune_linear_out_channels, idxs).prune()
        kept = cut.heads.count - len(cut.drop)
        _set_head_count(cut.module, cut.heads, kept)
        ctx.note(NAME, cut.name, f"removed heads {cut.drop} of {cut.heads.count}", removed=cut.drop, heads=kept)
    check_outputs(model, traced, NAME)


def _unhandled(module: nn.Module) -> str:
    if attention_of(module) is not None:
        return "a decoder attention (grouped-query or fused); decoder_head_pruning removes its key/value groups"
    return "not a multi-head attention layout this technique handles"


def _targets(model: nn.Module, spec: HeadPruningSpec, ctx: Context) -> list[_Target]:
    """(name, module, heads, how many to remove) for every addressed attention module that loses a head."""
    targets = []
    for name, module, ratio in resolve_layers(model, spec.head_ratio, LAYER_TYPES, NAME):
        heads = heads_of(module)
        if heads is None:
            if ratio > 0:
                ctx.note(NAME, name, f"kept all heads: {_unhandled(module)}")
            continue
        remove = heads_to_remove(heads.count, float(ratio))
        if remove > 0:
            targets.append((name, module, heads, remove))
    return targets


def apply(model: nn.Module, spec: HeadPruningSpec, ctx: Context) -> nn.Module:
    """Remove the least important heads of every addressed attention module, in place."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise SpecError(f"{NAME}: the model has parametrised layers; head pruning must run before them")
    targets = _targets(model, spec, ctx)
    if not targets:
        ctx.note(NAME, None, "no attention module loses a head at these ratios; nothing pruned")
        return model
    training = model.training
    try:
        _prune(model.eval(), targets, ctx)
    finally:
        model.train(training)
    return model


def prunable(layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """The attention modules a search prunes: those with the layout this technique handles and two heads or more."""
    return [name for name, module in layers if (heads := heads_of(module)) is not None and heads.count > 1]


register(
    Technique(
        name=NAME,
        spec_type=HeadPruningSpec,
        apply=apply,
        layer_types=LAYER_TYPES,
        stage=15,  # after low-rank (10), before channel pruning (20): heads go first, then feed-forward channels
        search=SearchSettings(
            per_layer=LayerSearch(
                setting="head_ratio",
                choices=(0.0, 0.25, 0.5),  # fraction of each attention module's heads removed
                off=0.0,
                title="attention heads removed",
                eligible=prunable,
            )
        ),
        structural=True,
    )
)

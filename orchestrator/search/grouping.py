"""Which layers share one search parameter: the layer groups of a technique, by role and depth.

`group_layers(model, names, grouping)` groups the layers a technique acts on (names of modules of `model`,
in model order). Groupings: `layer` (one group per layer), `block` (by the first component of the name),
`type` (by module class), and `auto`:

- up to `AUTO_LAYER_LIMIT` (12) layers: one group per layer, named by the layer;
- more: by *role* and *depth*, so a 12-block transformer gets about twenty parameters per technique and
  query/key/value, attention output and the FFN of early, middle and late blocks are searched apart.

Role (from the module and its name; HF and torchvision naming): `embeddings` (nn.Embedding, or anything
under a module named `*embed*`), `attention` (an attention module itself: nn.MultiheadAttention, a module
with `num_attention_heads`/`num_heads`, a class named `*Attention`), `head` (under `classifier`, `lm_head`,
`pooler`, `cls`, `score`, `qa_outputs`, `pre_classifier`, `head(s)`, or a top-level `fc`), `query`, `key`,
`value`, `qkv` (fused), `attn_out` (`attention.output.dense`, `o_proj`, `out_proj`, `attn.c_proj`, …),
`ffn_in` (`intermediate.dense`, `fc1`, `up_proj`, `gate_proj`, `linear1`, …), `ffn_out` (`output.dense`,
`fc2`, `down_proj`, `linear2`, the later Linear of an `mlp` Sequential, …), `downsample` (a conv under
`downsample` or `shortcut`), `conv`, `linear`, or else the class name in lower case.

Depth: the outermost component of the name that indexes repeated blocks — a number (`encoder.layer.7`,
`features.12`) or, above the layer itself, a name ending in a number among siblings of the same stem
(`layer1`…`layer4`, `encoder_layer_7`). Up to `NAMED_STAGES` (4) named siblings are kept apart as stages
(`layer2`); otherwise the blocks are split into thirds `early`/`middle`/`late` (halves `early`/`late` for
two blocks). `embeddings` and `head` are never split by depth. When the layers sit in more than one stack of
blocks (an encoder and a decoder), the group name starts with the stack's distinguishing name
(`decoder.query.late`).

Group name: `role.depth` (`query.early`, `ffn_in.late`, `conv.layer3`, `downsample.layer2`), or `role`
alone for `embeddings`, `head` and `attention`; any other layer outside repeated blocks keeps the `block`
key, its first name component (ResNet's stem `conv1`; a plain CNN's `conv1`…`conv15` stay one group each).
Names hold only letters, digits, `_` and `.`, so they are valid parameter-name suffixes (`bits.query.early`).

Decisions: role and depth are read from names and module types only (no forward pass, no tracing): it
must be fast and work for any layer list a technique offers, and HF and torchvision naming is regular.
Small models keep one parameter per layer, exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

import techniques

AUTO_LAYER_LIMIT = 12  # `auto` grouping: one parameter per layer up to this many layers
NAMED_STAGES = 4  # up to this many named stages (`layer1`…`layer4`) stay apart; more are banded
BANDS = {2: ("early", "late"), 3: ("early", "middle", "late")}

HEAD_NAMES = {"classifier", "lm_head", "pooler", "cls", "score", "qa_outputs", "pre_classifier", "head", "heads"}
QUERY = {"query", "q_proj", "q", "q_lin", "wq", "query_proj"}
KEY = {"key", "k_proj", "k", "k_lin", "wk", "key_proj"}
VALUE = {"value", "v_proj", "v", "v_lin", "wv", "value_proj"}
QKV = {"qkv", "query_key_value", "c_attn", "wqkv", "qkv_proj", "in_proj"}
ATTN_OUT = {"o_proj", "out_proj", "o", "out_lin"}
FFN_IN = {"fc1", "up_proj", "gate_proj", "lin1", "linear1", "c_fc", "wi", "wi_0", "wi_1", "w1", "w3", "dense_h_to_4h"}
FFN_OUT = {"fc2", "down_proj", "lin2", "linear2", "w2", "dense_4h_to_h"}
EITHER_OUT = {"wo", "c_proj"}  # attention output under an attention module, else FFN output
GENERIC_OUT = {"dense", "proj"}  # … and only under an FFN container when not under attention
FFN_CONTAINERS = {"output", "mlp", "ffn", "feed_forward", "feedforward", "densereludense"}
SHORTCUTS = {"downsample", "shortcut"}
UNBANDED_ROLES = {"embeddings", "head"}  # never split by depth
ROLES_ANYWHERE = {"embeddings", "head", "attention"}  # the roles that name a group outside repeated blocks


def is_attention(module: nn.Module) -> bool:
    """Whether `module` is an attention block itself (not a projection inside one)."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    return any(isinstance(getattr(module, attr, None), int) for attr in ("num_attention_heads", "num_heads"))


def has_attention(model: nn.Module) -> bool:
    """Whether the model holds attention (a transformer): HF config or any attention module."""
    if isinstance(getattr(getattr(model, "config", None), "num_attention_heads", None), int):
        return True
    return any(is_attention(module) for module in model.modules())


def _under_attention(ancestors: Sequence[str]) -> bool:
    return any("attn" in part or "attention" in part for part in ancestors)


def _projection_role(last: str, ancestors: Sequence[str]) -> str | None:
    """The transformer role a Linear's own name gives it (None when its name says nothing)."""
    parent = ancestors[-1] if ancestors else ""
    for role, names in (("query", QUERY), ("key", KEY), ("value", VALUE), ("qkv", QKV), ("attn_out", ATTN_OUT)):
        if last in names:
            return role
    if last in FFN_IN or (last == "dense" and parent == "intermediate"):
        return "ffn_in"
    if last in FFN_OUT:
        return "ffn_out"
    if last in EITHER_OUT or last in GENERIC_OUT:
        if _under_attention(ancestors):
            return "attn_out"
        if last in EITHER_OUT or parent in FFN_CONTAINERS:
            return "ffn_out"
    return None


def _mlp_position(model: nn.Module, parts: Sequence[str], module: nn.Module) -> str | None:
    """`ffn_in`/`ffn_out` for an unnamed Linear of an MLP Sequential (`mlp.0`, `mlp.3`): first or later."""
    if len(parts) < 2 or parts[-2].lower() not in FFN_CONTAINERS or not isinstance(module, nn.Linear):
        return None
    container = model.get_submodule(".".join(parts[:-1]))
    first = next((name for name, m in container.named_children() if isinstance(m, nn.Linear)), None)
    return "ffn_in" if first == parts[-1] else "ffn_out"


def role_of(model: nn.Module, name: str) -> str:
    """The role of layer `name` of `model` (see the module docstring)."""
    module = model.get_submodule(name)
    parts = name.split(".")
    lowered = [part.lower() for part in parts]
    last, ancestors = lowered[-1], lowered[:-1]
    if isinstance(module, nn.Embedding | nn.EmbeddingBag) or any("embed" in part for part in ancestors):
        return "embeddings"
    if is_attention(module) or type(module).__name__.endswith("Attention"):
        return "attention"
    if any(part in HEAD_NAMES for part in lowered) or lowered == ["fc"]:
        return "head"
    role = _projection_role(last, ancestors) or _mlp_position(model, parts, module)
    if role is not None:
        return role
    kind = techniques.base_type(module)
    if issubclass(kind, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return "downsample" if any(part in SHORTCUTS for part in ancestors) else "conv"
    return "linear" if issubclass(kind, nn.Linear) else _clean(kind.__name__.lower())


@dataclass(frozen=True)
class Depth:
    """Where a layer sits in repeated blocks: the stack (`bert.encoder.layer`) and its depth label."""

    stack: tuple[str, ...]
    label: str


def _siblings(parent: nn.Module, part: str, last: bool) -> list[str] | None:
    """The children of `parent` that repeat like `part` does (numbers, or one stem with numbers — not for a
    layer's own name: `fc1` beside `fc2` is not a stack), ordered."""
    children = [name for name, _ in parent.named_children()]
    if part.isdigit():
        return sorted((c for c in children if c.isdigit()), key=int)
    stem = re.fullmatch(r"(.*\D)(\d+)", part)
    if stem is None or last:
        return None
    same = [c for c in children if re.fullmatch(re.escape(stem.group(1)) + r"\d+", c)]
    return sorted(same, key=lambda c: int(c[len(stem.group(1)) :]))


def depth_of(model: nn.Module, name: str) -> Depth | None:
    """The depth of layer `name` in the outermost repeated blocks it sits in (None outside any)."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        parent = model.get_submodule(".".join(parts[:index]))
        siblings = _siblings(parent, part, last=index == len(parts) - 1)
        if not siblings or len(siblings) < 2:
            continue
        count, position = len(siblings), siblings.index(part)
        stem = re.sub(r"\d+$", "", part)
        stack = (*parts[:index], stem)
        if stem and count <= NAMED_STAGES:
            return Depth(stack, _clean(part))
        bands = BANDS[min(count, 3)]
        return Depth(stack, bands[position * len(bands) // count])
    return None


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", text)


def _stack_labels(stacks: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """A short distinguishing name for each stack of blocks (empty when there is only one)."""
    unique = list(dict.fromkeys(stacks))
    if len(unique) < 2:
        return {stack: "" for stack in unique}
    common = 0
    while all(len(s) > common + 1 for s in unique) and len({s[common] for s in unique}) == 1:
        common += 1
    return {stack: _clean(next((part for part in stack[common:] if part), "blocks")) for stack in unique}


def auto_groups(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The `auto` grouping (see the module docstring)."""
    if len(names) <= AUTO_LAYER_LIMIT:
        return {name: (name,) for name in names}
    roles = {name: role_of(model, name) for name in names}
    depths = {name: None if roles[name] in UNBANDED_ROLES else depth_of(model, name) for name in names}
    stacks = _stack_labels([d.stack for d in depths.values() if d is not None])
    grouped: dict[str, list[str]] = {}
    for name in names:
        role, depth = roles[name], depths[name]
        if depth is None:
            key = role if role in ROLES_ANYWHERE else _clean(name.split(".")[0])
        else:
            key = ".".join(part for part in (stacks[depth.stack], role, depth.label) if part)
        grouped.setdefault(key, []).append(name)
    return {group: tuple(layers) for group, layers in grouped.items()}


def _by_key(names: Sequence[str], key: Callable[[str], str]) -> dict[str, tuple[str, ...]]:
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(key(name), []).append(name)
    return {group: tuple(layers) for group, layers in grouped.items()}


def regex_groups(names: Sequence[str], patterns: Sequence[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """The user's named groups: each layer joins the first group whose regex matches it (others join none)."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        for group, pattern in patterns:
            if re.fullmatch(pattern.removeprefix("re:"), name):
                grouped.setdefault(group, []).append(name)
                break
    return {group: tuple(layers) for group, layers in grouped.items()}


def group_layers(
    model: nn.Module, names: Sequence[str], grouping: str = "auto", patterns: Sequence[tuple[str, str]] = ()
) -> Mapping[str, tuple[str, ...]]:
    """Group layers `names` of `model` (model order) by the user's regex `patterns` if any, else by `grouping`."""
    if patterns:
        return regex_groups(names, patterns)
    if grouping == "auto":
        return auto_groups(model, names)
    keys: dict[str, Callable[[str], str]] = {
        "layer": lambda name: name,
        "block": lambda name: name.split(".")[0],
        "type": lambda name: techniques.base_type(model.get_submodule(name)).__name__,
    }
    return _by_key(names, keys[grouping])

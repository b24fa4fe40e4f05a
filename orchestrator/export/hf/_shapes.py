"""The transformers config of a compressed decoder, read from the shapes its modules really have.

Decisions:
- A transformers config holds one head count, one KV-head count and one FFN width for every decoder layer, so
  they are read per layer from the modules (never from the checkpoint's stale config or from any technique's
  records): query heads = q_proj.out_features // head_dim, KV heads = k_proj's, FFN width = gate_proj's (Llama,
  Qwen2, Mistral: gated FFNs) or c_fc's (GPT-2); the number of layers is the length of the decoder-layer list.
  A model whose layers differ is refused in one line naming the first layer that differs and what it has.
- Only what differs from the shapes the original config implies is changed (its class built on the meta device and
  read the same way), and listed in the report. `head_dim` is written explicitly whenever the head count changed
  (transformers defaults it to hidden_size // num_attention_heads, which pruning heads breaks). GPT-2's config has
  no head_dim (it is n_embd // n_head), so a GPT-2 with pruned heads cannot be described and is refused.
- Per-layer attention types (Qwen2's `layer_types`, sliding or full) follow the layers that are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from orchestrator.errors import UserError
from techniques.packed.layers import PackedLayer


class ShapeError(UserError):
    """The model's decoder layers cannot be described by one transformers config."""


def out_features(module: nn.Module) -> int:
    """Output width of a Linear, a packed Linear, transformers' Conv1D (weight stored (in, out)), or a low-rank
    chain of them (its last factor's)."""
    if isinstance(module, nn.Sequential) and len(module):
        return out_features(module[-1])
    if isinstance(module, PackedLayer):
        return int(module.weight_shape[0])
    if type(module).__name__ == "Conv1D":
        return int(cast(Any, module).nf)  # a plain attribute of transformers' Conv1D
    return int(cast(torch.Tensor, module.weight).shape[0])


def _gated(layer: nn.Module) -> dict[str, int]:
    """Llama/Qwen2/Mistral: q/k/v/o projections and a gated FFN."""
    attn, mlp = cast(Any, layer).self_attn, cast(Any, layer).mlp  # transformers' modules, read by attribute
    head_dim = int(attn.head_dim)
    q, k, v = (out_features(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj"))
    gate, up = out_features(mlp.gate_proj), out_features(mlp.up_proj)
    if q % head_dim or k % head_dim or k != v or gate != up:
        raise ShapeError(f"q/k/v widths {q}/{k}/{v} (head_dim {head_dim}) or gate/up widths {gate}/{up} do not fit")
    return {"num_attention_heads": q // head_dim, "num_key_value_heads": k // head_dim,
            "intermediate_size": gate, "head_dim": head_dim}  # fmt: skip


def _gpt2(layer: nn.Module) -> dict[str, int]:
    """GPT-2: fused c_attn (query, key, value side by side) and c_fc."""
    attn, mlp = cast(Any, layer).attn, cast(Any, layer).mlp  # transformers' modules, read by attribute
    head_dim, qkv = int(attn.head_dim), out_features(attn.c_attn)
    if qkv % (3 * head_dim):
        raise ShapeError(f"c_attn's width {qkv} is not 3 x heads x head_dim {head_dim}")
    return {"n_head": qkv // (3 * head_dim), "n_inner": out_features(mlp.c_fc)}


@dataclass(frozen=True)
class Family:
    """Where a family keeps its decoder layers, the submodule that marks one of its layers, and how one layer's
    shapes read as config values."""

    layers: str
    marker: str
    shapes: Callable[[nn.Module], dict[str, int]]
    depth_key: str


FAMILIES = (Family("layers", "self_attn", _gated, "num_hidden_layers"), Family("h", "attn", _gpt2, "n_layer"))


def _family(model: nn.Module) -> tuple[Family, nn.ModuleList]:
    base = getattr(model, "base_model", model)
    for family in FAMILIES:
        layers = getattr(base, family.layers, None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], family.marker):
            return family, layers
    raise ShapeError(
        f"--format hf writes decoders laid out like Llama/Qwen2 (q/k/v/o and gate/up/down projections) or GPT-2 "
        f"(c_attn, c_fc); {type(model).__name__} is neither: use --format onnx"
    )


def layer_shapes(model: nn.Module) -> tuple[Family, list[dict[str, int]]]:
    """The family and each decoder layer's shapes as config values; ShapeError for a layer that does not fit."""
    family, layers = _family(model)
    kind, shapes = type(layers[0]), []
    for index, layer in enumerate(layers):
        if type(layer) is not kind:
            raise ShapeError(f"decoder layer {index} is a {type(layer).__name__}, not a {kind.__name__}")
        try:
            shapes.append(family.shapes(layer))
        except (AttributeError, ShapeError) as exc:
            raise ShapeError(f"decoder layer {index} does not fit a transformers config: {exc}") from None
    return family, shapes


def uniform(shapes: list[dict[str, int]]) -> dict[str, int]:
    """The one set of shapes every layer has; ShapeError naming the first layer that differs and how."""
    first = shapes[0]
    for index, shape in enumerate(shapes[1:], start=1):
        for key, value in shape.items():
            if value != first[key]:
                raise ShapeError(
                    f"decoder layer {index} has {key}={value} where layer 0 has {first[key]}: a transformers config "
                    f"holds one {key} for every layer, so --format hf needs uniform layers (or use --format onnx)"
                )
    return first


def _implied(model: nn.Module) -> dict[str, int]:
    """The shapes the model's own (uncompressed) config gives every layer: its class built on the meta device."""
    with torch.device("meta"):
        original = type(model)(copy.deepcopy(model.config))
    family, shapes = layer_shapes(original)
    return {**shapes[0], family.depth_key: len(shapes)}


def derived_config(model: Any) -> tuple[Any, dict[str, list[Any]]]:
    """A copy of `model.config` with the shapes the modules have, and what changed ({key: [was, now]})."""
    family, shapes = layer_shapes(model)
    values, implied = {**uniform(shapes), family.depth_key: len(shapes)}, _implied(model)
    changes = {key: [implied[key], value] for key, value in values.items() if implied[key] != value}
    config = copy.deepcopy(model.config)
    if family.depth_key == "n_layer" and "n_head" in changes:
        raise ShapeError(
            f"GPT-2's config derives the head size from n_embd / n_head: {values['n_head']} heads where n_embd "
            f"{config.n_embd} needs {config.n_head}; a GPT-2 with pruned heads cannot be written (use --format onnx)"
        )
    for key, (_, value) in changes.items():
        setattr(config, key, value)
    if "head_dim" in changes or "num_attention_heads" in changes:
        config.head_dim = values["head_dim"]  # transformers' default, hidden_size // heads, no longer holds
    types = _layer_types(model, config)
    if types is not None:
        config.layer_types = types
    return config, changes


def _layer_types(model: nn.Module, config: Any) -> list[str] | None:
    """Each kept layer's attention type (Qwen2's sliding/full), from the layer itself where it says."""
    recorded = getattr(config, "layer_types", None)
    if recorded is None:
        return None
    _, layers = _family(model)
    types = []
    for index, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        kind = getattr(attn, "layer_type", None) or getattr(layer, "attention_type", None)
        if kind is None:
            original = getattr(attn, "layer_idx", index)
            kind = recorded[original] if isinstance(original, int) and original < len(recorded) else recorded[-1]
        types.append(kind)
    return types

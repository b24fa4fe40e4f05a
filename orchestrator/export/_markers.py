"""Marker ops that stand in for packed layers while torch.onnx.export traces a model.

Decisions: the exporter never sees a packed layer's buffers or decode arithmetic (it would write dense float32
weights, and `aten::_int_mm` has no ONNX translation). A copy of the model has each PackedLinear and
PackedEmbedding replaced by a module calling an opaque custom op, and each PackedConv2d's weight produced by
one; the ops translate to nodes of the private `orchestrator.export` domain that carry the layer's index, which
`_onnx.rewrite` replaces by the real low-bit nodes. Everything else (activation fake-quant, padding modes,
convolution geometry, the rest of the model) is exported by torch as usual.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import onnxscript
import torch
from onnx.defs import OpSchema
from torch import nn

from techniques import set_module
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.layers import (
    INT_KERNEL,
    PackedConv2d,
    PackedLinear,
    fake_quantize_rows,
    quantize_activation,
)

DOMAIN = "orchestrator.export"
PackedModule = PackedLinear | PackedConv2d | PackedEmbedding


@torch.library.custom_op("orchestrator_export::linear", mutates_args=())
def linear_marker(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    """Stands in for packed Linear number `index` (shape only: the exported graph replaces it)."""
    return x.new_zeros((*x.shape[:-1], out_features))


@linear_marker.register_fake
def _linear_shape(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("orchestrator_export::weight", mutates_args=())
def weight_marker(anchor: torch.Tensor, index: int, shape: list[int]) -> torch.Tensor:
    """Stands in for the float32 weight of packed layer `index` (`anchor`: any of its buffers)."""
    return torch.zeros(shape, device=anchor.device)


@weight_marker.register_fake
def _weight_shape(anchor: torch.Tensor, index: int, shape: list[int]) -> torch.Tensor:
    return anchor.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("orchestrator_export::embedding", mutates_args=())
def embedding_marker(ids: torch.Tensor, index: int, dim: int) -> torch.Tensor:
    """Stands in for the lookup of packed embedding number `index`."""
    return torch.zeros((*ids.shape, dim), device=ids.device)


@embedding_marker.register_fake
def _embedding_shape(ids: torch.Tensor, index: int, dim: int) -> torch.Tensor:
    return ids.new_empty((*ids.shape, dim), dtype=torch.float32)


def _schema(name: str, inputs: list[str]) -> OpSchema:
    index = OpSchema.Attribute("index", OpSchema.AttrType.INT, "the packed layer's number")
    return OpSchema(
        name,
        DOMAIN,
        1,
        inputs=[OpSchema.FormalParameter("input", "T")],
        outputs=[OpSchema.FormalParameter("output", "F")],
        type_constraints=[("T", inputs, "input"), ("F", ["tensor(float)"], "output")],
        attributes=[index],
    )


def _marker_node(op_type: str, inputs: list[str]) -> Callable[..., Any]:
    op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), op_type, _schema(op_type, inputs))

    def translate(tensor: Any, index: int, *_: Any) -> Any:
        return op(tensor, index=index)

    return translate


TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.orchestrator_export.linear.default: _marker_node("Linear", ["tensor(float)"]),
    torch.ops.orchestrator_export.weight.default: _marker_node(
        "Weight", ["tensor(uint8)", "tensor(float16)", "tensor(float)"]
    ),
    torch.ops.orchestrator_export.embedding.default: _marker_node("Embedding", ["tensor(int64)", "tensor(int32)"]),
}


class LinearMarker(nn.Module):
    """A packed Linear's place in the traced graph: activation fake-quant (when it has no integer kernel), then
    the marker."""

    def __init__(self, packed: PackedLinear, index: int) -> None:
        super().__init__()
        self.index, self.out_features = index, packed.out_features
        fake_quant = packed.act_bits is not None and packed.kernel != INT_KERNEL
        self.act_dynamic = fake_quant and packed.act_dynamic  # per-row scales, computed in the graph
        self.act_scale: torch.Tensor | None
        static = fake_quant and not packed.act_dynamic
        self.register_buffer("act_scale", packed.act_scale.detach().clone() if static else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_dynamic:
            x = fake_quantize_rows(x)
        elif self.act_scale is not None:
            x = quantize_activation(x, self.act_scale) * self.act_scale
        return linear_marker(x, self.index, self.out_features)


class EmbeddingMarker(nn.Module):
    """A packed embedding's place in the traced graph."""

    def __init__(self, packed: PackedEmbedding, index: int) -> None:
        super().__init__()
        self.index, self.dim = index, packed.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding_marker(ids, self.index, self.dim)


def marked_copy(model: nn.Module) -> tuple[nn.Module, list[tuple[str, PackedModule]]]:
    """A CPU copy of `model` with every packed layer marked, and the (name, packed layer) list the markers'
    indices point into. A PackedConv2d keeps its own forward, with its weight coming from a marker."""
    marked = copy.deepcopy(model).cpu().eval()
    layers: list[tuple[str, PackedModule]] = []
    for name, module in list(marked.named_modules()):
        if not isinstance(module, PackedLinear | PackedConv2d | PackedEmbedding):
            continue
        index = len(layers)
        layers.append((name or "model", module))
        if not isinstance(module, PackedEmbedding):  # decoded weights a forward cached are not in the artifact
            module.drop_caches()
        if isinstance(module, PackedConv2d):
            shape = list(module.weight_shape)
            module.dense_weight = functools.partial(weight_marker, module.values, index, shape)  # type: ignore[method-assign]
            continue
        stand_in = LinearMarker(module, index) if isinstance(module, PackedLinear) else EmbeddingMarker(module, index)
        if not name:
            return stand_in, layers
        set_module(marked, name, stand_in)
    return marked, layers

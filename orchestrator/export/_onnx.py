"""The ONNX writer: torch.onnx.export (dynamo) of a marked copy, then each marker rewritten into low-bit nodes.

Decisions:
- The dynamo exporter (torch.export underneath) handles models called with a tensor, a tuple or keyword
  tensors (Hugging Face dict inputs): graph inputs are named after the forward's parameters (the dict keys) and
  dim 0 of every input is a dynamic `batch` axis.
- Graph outputs are named after the model's output structure (`logits` of a ModelOutput, `output` for a tensor);
  the exporter's per-node metadata (stack traces with this machine's paths, FX node text: over 80% of a small
  model's file) is dropped.
- A smoothed PackedLinear (techniques.smoothing) is exported as a Mul by its stored 1/s scales before its marker
  (and before any activation fake-quant the marker traces), so every kernel the marker becomes sees the smoothed
  input, as the PyTorch layer computes it.
- Opset 21 (int4 tensors and their Cast); the ONNX Runtime contrib domain is imported only when a contrib op is
  used. Initializers nothing reads after the rewrite (the buffers a conv's weight marker was anchored on, decode
  caches) are dropped. IR version as the exporter writes it (10; ORT 1.31 reads up to 13).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import onnx
import torch
from onnx import helper
from torch import nn

from orchestrator.export import _onnx_layers as layers_onnx
from orchestrator.export._markers import DOMAIN, TRANSLATIONS, LinearMarker, PackedModule, marked_copy
from orchestrator.export._trace import (
    ExportError,
    Written,
    call_arguments,
    dynamic_batch,
    first_line,
    output_names,
)
from techniques import set_module
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.layers import PackedConv2d, PackedLinear
from techniques.tools.inputs import Inputs, call_model

OPSET = 21
MSFT_OPSET = 1
PROTOBUF_LIMIT = 2**31  # bytes: a larger ModelProto cannot be serialised


def export_onnx(model: nn.Module, inputs: Inputs, *, int8_activations: bool = False) -> Written:
    """The ONNX file of a finalized model (low-bit layers kept low-bit) with one report entry per packed layer;
    `int8_activations`: MatMulNBits quantises activations on the fly (see _onnx_layers)."""
    marked, packed = marked_copy(model)
    marked = _smoothed_markers(marked, packed)
    args, kwargs = call_arguments(inputs)
    try:
        with warnings.catch_warnings(), _quiet("onnxscript"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                marked,
                args,
                kwargs=kwargs,
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes=dynamic_batch(inputs),
                custom_translation_table=TRANSLATIONS,
                verbose=False,
            )
    except Exception as exc:  # the exporter's own error types vary between torch releases
        raise ExportError(f"torch.onnx.export cannot export this model: {first_line(exc)}") from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    records = rewrite(proto, packed, int8_activations=int8_activations)
    with torch.no_grad():
        _rename_outputs(proto.graph, output_names(call_model(model, inputs)))
    for node in proto.graph.node:  # debugging aids: stack traces with this machine's paths, FX node text
        del node.metadata_props[:]
    if proto.ByteSize() >= PROTOBUF_LIMIT:
        raise ExportError("the ONNX model is over 2 GiB, protobuf's limit; external weight files are not supported yet")
    opsets = ", ".join(f"{opset.domain or 'ai.onnx'} {opset.version}" for opset in proto.opset_import)
    return Written(
        data=proto.SerializeToString(),
        layers=records,
        inputs=[value.name for value in proto.graph.input],
        outputs=[value.name for value in proto.graph.output],
        runtime=f"onnxruntime {metadata.version('onnxruntime')} (CPUExecutionProvider); opsets {opsets}",
    )


class _SmoothedInput(nn.Module):
    """A smoothed packed Linear's marker behind its per-input-channel scales 1/s: the exporter writes the product as
    a Mul before the layer's nodes (and before its activation fake-quant, which the marker traces)."""

    input_scale: torch.Tensor  # registered buffer

    def __init__(self, scale: torch.Tensor, marker: nn.Module) -> None:
        super().__init__()
        self.register_buffer("input_scale", scale.detach().clone())
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.marker(x * self.input_scale)


def _smoothed_markers(marked: nn.Module, packed: list[tuple[str, PackedModule]]) -> nn.Module:
    """`marked` with each smoothed PackedLinear's marker behind its input scales (`_SmoothedInput`)."""
    for name, module in list(marked.named_modules()):
        layer = packed[module.index][1] if isinstance(module, LinearMarker) else None
        if isinstance(layer, PackedLinear) and layer.smoothed:
            wrapped = _SmoothedInput(layer.input_scale, module)
            if not name:
                return wrapped
            set_module(marked, name, wrapped)
    return marked


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hold logger `name` to errors for the block (the exporter's optimizer logs each constant it cannot fold)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _build(node: onnx.NodeProto, name: str, module: PackedModule, int8_activations: bool) -> layers_onnx.Built:
    if node.op_type == "Linear" and isinstance(module, PackedLinear):
        return layers_onnx.linear(module, name, node.input[0], node.output[0], int8_activations=int8_activations)
    if node.op_type == "Weight" and isinstance(module, PackedConv2d):
        return layers_onnx.conv_weight(module, name, node.output[0])
    if node.op_type == "Embedding" and isinstance(module, PackedEmbedding):
        return layers_onnx.embedding(module, name, node.input[0], node.output[0])
    raise ExportError(f"marker {node.op_type} does not match layer {name} ({type(module).__name__})")


def rewrite(
    proto: onnx.ModelProto, packed: list[tuple[str, PackedModule]], *, int8_activations: bool = False
) -> list[dict[str, Any]]:
    """Replace every marker node of `proto` (in place) by its layer's nodes; return the layers' report entries."""
    graph = proto.graph
    nodes: list[onnx.NodeProto] = []
    records = []
    taken = {tensor.name for tensor in graph.initializer}
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        index = next(attr.i for attr in node.attribute if attr.name == "index")
        name, module = packed[index]
        built = _build(node, name, module, int8_activations)
        clash = taken & {tensor.name for tensor in built.initializers}
        if clash:
            raise ExportError(f"initializer name(s) {sorted(clash)} of layer {name} already exist in the graph")
        taken |= {tensor.name for tensor in built.initializers}
        nodes.extend(built.nodes)
        graph.initializer.extend(built.initializers)
        records.append({"name": name, "type": type(module).__name__, **built.record})
    del graph.node[:]
    graph.node.extend(nodes)
    _check_no_markers(proto)
    _drop_unused_initializers(graph)
    _set_opsets(proto)
    return records


def _check_no_markers(proto: onnx.ModelProto) -> None:
    left = [node.name for function in proto.functions for node in function.node if node.domain == DOMAIN]
    left += [node.name for node in proto.graph.node if node.domain == DOMAIN]
    if left:
        raise ExportError(f"packed layers inside ONNX functions cannot be rewritten: {left[:3]}")


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of `graph` (or of a subgraph in its attributes) reads, and the graph's outputs."""
    read = {output.name for output in graph.output}
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for subgraph in [attr.g] if attr.HasField("g") else list(attr.graphs):
                read |= _names_read(subgraph)
    return read


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = _names_read(graph)
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _set_opsets(proto: onnx.ModelProto) -> None:
    domains = {node.domain for node in proto.graph.node}
    kept = [opset for opset in proto.opset_import if opset.domain not in (DOMAIN, layers_onnx.MSFT)]
    if layers_onnx.MSFT in domains:
        kept.append(helper.make_opsetid(layers_onnx.MSFT, MSFT_OPSET))
    del proto.opset_import[:]
    proto.opset_import.extend(kept)


def _rename_outputs(graph: onnx.GraphProto, names: list[str]) -> None:
    """Give the graph's outputs `names` (when they are as many, distinct, and unused in the graph)."""
    used = {name for node in graph.node for name in [*node.input, *node.output]}
    used |= {value.name for value in [*graph.input, *graph.initializer]}
    old = [value.name for value in graph.output]
    if len(names) != len(old) or len(set(names)) != len(names) or (used - set(old)) & set(names):
        return
    mapping = dict(zip(old, names, strict=True))
    for node in graph.node:
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]
    for value in [*graph.output, *graph.value_info]:
        value.name = mapping.get(value.name, value.name)

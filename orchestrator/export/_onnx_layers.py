"""ONNX nodes and initializers for one packed layer, keeping its weights at (or near) their stored bit-width.

Decisions (the speeds are ONNX Runtime's CPU kernels; the measurements are in docs/BENCHMARKS.md):
- Linear layers with 2-4-bit codes run the contrib `com.microsoft.MatMulNBits` with 4-bit storage (blocks of
  16-256 along K; codes offset by the default zero point 8, which is the project's symmetric quantisation
  exactly). 4-bit MatMulNBits with float activations runs at fp32 speed; its 2- and 8-bit kernels are slow
  fallbacks (many times slower than fp32), so 2- and 3-bit codes are stored in 4 bits.
- With `int8_activations` ONNX Runtime quantises activations its own way, faster; outputs move away from
  PyTorch's by that rounding, so it is a choice, off by default. 2-4-bit Linear layers run MatMulNBits at
  accuracy_level 4 (int8 activations on the fly, faster than fp32); 5-8-bit Linear layers with one scale per
  output channel, weight-only or `w8a8-dynamic`, run ORT's fused `DynamicQuantizeMatMul` (per-tensor uint8
  activations, the kernel ORT's own `quantize_dynamic` produces: faster than the exact per-row graph below, whose
  15 small nodes per layer cost more than the GEMM saves); other 5-8-bit layers run 8-bit MatMulNBits.
- The int8 kernel (8-bit weights, 8-bit static activations) becomes Div, Round, Clip to +-127 (PyTorch's
  arithmetic, so the codes are the same; `QuantizeLinear` rounds a few boundary values the other way), +128 and
  a Cast to uint8, then `MatMulInteger` (u8 x u8 -> int32, both zero points 128; int8 activations take a slow
  path) + rescale + bias: the same integers as `torch._int_mm`. Weights are shifted to uint8 too: ONNX Runtime's
  u8 x s8 kernel on AVX2 without VNNI sums pairs of products in saturating int16 (`vpmaddubsw`; its docs
  suggest u8 x u8 or reduced-range weights), which puts outputs off by whole units on such CPUs.
- With dynamic per-row activations (bits "w8a8-dynamic") the scale is computed in the graph as PyTorch does:
  ReduceMax(Abs(x)) over the last axis, Div by 127, Where(> 0, ., 1); then the same Div, Round, Clip, uint8
  shift and `MatMulInteger`, its float result multiplied by the row scales, then by the channel scales. Not
  first the product of the two scales: ORT's MatMulIntegerToFloat fusion (extended optimisations) splits such a
  Mul into a per-tensor A scale and a per-column B scale and gets per-row scales wrong. Not ONNX's
  `DynamicQuantizeLinear` either: one asymmetric uint8 scale per tensor, the precision per-row scales keep.
- Layers with no fast low-bit kernel (5-8-bit float-activation Linear layers, every Conv, groups MatMulNBits
  blocks cannot take) store int4/int8 codes and scales, decoded by Cast + Mul + Reshape, which ORT
  constant-folds to float32 at load. Not `DequantizeLinear`: ORT keeps that unfolded and dequantizes on every
  run (slower than fp32).
- Embeddings run `com.microsoft.GatherBlockQuantized` (uint8-packed 2/4/8-bit rows; only the gathered rows are
  dequantized); shapes it cannot take fall back to a Gather of int8 codes and one of scales, then a Mul.
- A smoothed Linear's per-input-channel Mul (techniques.smoothing) is written by `_onnx` before the layer's nodes;
  the layer's report entry notes it.
- float16 weights are stored in float16 behind a Cast (folded at load); sparse float32 weights are stored dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from techniques.packed.bits import unpack_rows
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.layers import ACT_QMAX, FLOAT_BITS, INT_KERNEL, PackedConv2d, PackedLayer, PackedLinear

MSFT = "com.microsoft"
GATHER_WIDTHS = (2, 4, 8)  # what GatherBlockQuantized takes
NBITS_BLOCKS = (16, 32, 64, 128, 256)  # what MatMulNBits and GatherBlockQuantized take
AT_LOAD = "no low-bit kernel: dequantized to fp32 at load"
SPARSITY_NOTE = 0.25  # a layer with at least this fraction of zero weights is noted as run dense


@dataclass
class Built:
    """The nodes and initializers that replace one marker, and what the report says about the layer."""

    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def add(self, suffix: str, array: np.ndarray | np.generic | onnx.TensorProto) -> str:
        """Add an initializer named `LAYER.suffix`; return its name."""
        tensor = array if isinstance(array, onnx.TensorProto) else numpy_helper.from_array(np.ascontiguousarray(array))
        tensor.name = f"{self.name}.{suffix}"
        self.initializers.append(tensor)
        return tensor.name

    def node(self, op: str, inputs: list[str], output: str | None = None, domain: str = "", **attrs: Any) -> str:
        """Add a node; its output is `output` or a fresh `LAYER/op_N` name, which is returned."""
        output = output or f"{self.name}/{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}/node", domain=domain, **attrs))
        return output

    def describe(
        self, module: PackedLayer | PackedEmbedding, op: str, stored: int, kernel: str, *notes: str, low_bit: bool
    ) -> None:
        """The report entry: op, stored width, kernel, whether that kernel computes on the low-bit weights, notes."""
        self.record = {"bits": module.bits, "op": op, "stored_bits": stored, "kernel": kernel,
                       "low_bit_kernel": low_bit, **_sparsity(module),
                       "notes": [*notes, *_activation_note(module)]}  # fmt: skip
        if stored < 16 and stored != module.bits:
            self.record["notes"].insert(0, f"{module.bits}-bit codes stored in {stored} bits")
        if self.record["sparsity"] >= SPARSITY_NOTE:
            self.record["notes"].append(
                f"{self.record['sparsity']:.0%} zero weights, stored and run dense (no sparse kernel in ORT on the CPU)"
            )


def _sparsity(module: PackedLayer | PackedEmbedding) -> dict[str, float]:
    weight = module.decode_weight() if isinstance(module, PackedLayer) else module.dense_weight()
    return {"sparsity": round(float((weight == 0).float().mean()), 4)}


def _activation_note(module: PackedLayer | PackedEmbedding) -> list[str]:
    notes = []
    if isinstance(module, PackedLinear) and module.smoothed:
        notes.append("inputs smoothed: multiplied per channel by 1/s (a Mul before the layer's nodes)")
    if isinstance(module, PackedLayer) and module.act_bits is not None and module.kernel != INT_KERNEL:
        how = "dynamic per-row " if module.act_dynamic else ""
        notes.append(f"{how}8-bit activations fake-quantised in float (Div, Round, Clip, Mul), as in PyTorch")
    return notes


def pack_lsb(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit values (last axis a multiple of 8 // bits) packed into uint8, low bits first."""
    per = 8 // bits
    grouped = values.astype(np.int32).reshape(*values.shape[:-1], -1, per)
    packed = np.zeros(grouped.shape[:-1], np.int32)
    for i in range(per):
        packed |= grouped[..., i] << (i * bits)
    return packed.astype(np.uint8)


def int_tensor(codes: np.ndarray, bits: int) -> onnx.TensorProto:
    """Signed codes as an int4 (bits <= 4: two's-complement nibbles, low nibble first) or int8 tensor."""
    if bits > 4:
        return numpy_helper.from_array(codes.astype(np.int8))
    flat = codes.reshape(-1).astype(np.int32) & 0xF
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int32)])
    raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor("", TensorProto.INT4, codes.shape, vals=raw, raw=True)


def block_size(length: int, groups: int, bits: int) -> int | None:
    """The MatMulNBits/GatherBlockQuantized block along a row of `length` codes in `groups` scale groups: per
    channel, the block needing the fewest bytes; grouped, the largest supported block dividing the group."""
    if groups == 1:
        return min(NBITS_BLOCKS, key=lambda b: (math.ceil(length / b) * (b * bits // 8 + 4), -b))
    fitting = [b for b in NBITS_BLOCKS if (length // groups) % b == 0]
    return fitting[-1] if fitting else None


def blocked(codes: np.ndarray, scales: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [rows, blocks, block*bits/8] codes offset by the zero point 2^(bits-1), float32 [rows, blocks]
    scales) of (rows, length) codes with (rows, groups) scales; the last block is padded with zero codes."""
    rows, length = codes.shape
    blocks = math.ceil(length / block)
    unsigned = np.full((rows, blocks * block), 1 << (bits - 1), np.int32)
    unsigned[:, :length] = codes + (1 << (bits - 1))
    per_block = scales[:, (np.arange(blocks) * block) // (length // scales.shape[1])]
    return pack_lsb(unsigned, bits).reshape(rows, blocks, -1), per_block.astype(np.float32)


def _row_codes(module: PackedLayer) -> np.ndarray:
    """(out, row) int32 codes of a quantised packed layer, zero at pruned positions."""
    return module.decode_codes().reshape(module.weight_shape[0], -1).numpy().astype(np.int32)


def _add_bias(built: Built, module: PackedLayer, output: str, y: str) -> None:
    if module.bias is None:
        built.node("Identity", [output], y)
    else:
        built.node("Add", [output, built.add("bias", module.bias.numpy())], y)


def _folded_weight(built: Built, module: PackedLayer, transpose: bool) -> str:
    """Cast + Mul (+ Reshape) of int4/int8 codes and their scales: the float32 weight (transposed to (in, out)
    for a MatMul), all constant, so ORT folds it at load."""
    codes, scales = _row_codes(module), module.scale.numpy()
    out, groups = scales.shape
    grouped, scale = codes.reshape(out, groups, -1), scales[:, :, None]
    shape = list(module.weight_shape)
    if transpose:  # (groups, group, out) codes times (groups, 1, out) scales, reshaped to (in, out)
        grouped, scale, shape = grouped.transpose(1, 2, 0), scale.transpose(1, 2, 0), [codes.shape[1], out]
    weight = built.add("qweight", int_tensor(grouped, 4 if module.bits <= 4 else 8))
    product = built.node("Mul", [built.node("Cast", [weight], to=TensorProto.FLOAT), built.add("scales", scale)])
    return built.node("Reshape", [product, built.add("shape", np.array(shape, np.int64))])


def linear(module: PackedLinear, name: str, x: str, y: str, *, int8_activations: bool = False) -> Built:
    """Nodes computing `y = layer(x)` for a packed Linear (x: [..., in_features])."""
    built = Built(name)
    if module.bits in FLOAT_BITS:
        weight = module.decode_weight().t().numpy()
        matrix = built.add("weight_t", weight.astype(np.float16) if module.bits == 16 else weight)
        if module.bits == 16:
            matrix = built.node("Cast", [matrix], to=TensorProto.FLOAT)
        _add_bias(built, module, built.node("MatMul", [x, matrix]), y)
        kernel = "MatMul (fp32)" if module.bits == 32 else f"MatMul ({AT_LOAD})"
        built.describe(module, "MatMul", module.bits, kernel, low_bit=False)
        return built
    if int8_activations and _runtime_int8(module):
        return _dynamic_int8_linear(module, built, x, y)
    if module.kernel == INT_KERNEL:
        return _int8_linear(module, built, x, y)
    width = 4 if module.bits <= 4 else 8
    block = block_size(module.in_features, module.scale.shape[1], width)
    if block is None or (width == 8 and not int8_activations):
        _add_bias(built, module, built.node("MatMul", [x, _folded_weight(built, module, transpose=True)]), y)
        why = "no MatMulNBits block (16-256) divides the group size" if block is None else (
            "ORT's 8-bit MatMulNBits is a slow fallback with fp32 activations")  # fmt: skip
        built.describe(module, "MatMul", width, f"MatMul ({AT_LOAD})", why, low_bit=False)
        return built
    return _nbits_linear(module, built, x, y, (width, block), int8_activations)


def _nbits_linear(module: PackedLinear, built: Built, x: str, y: str, layout: tuple[int, int], int8: bool) -> Built:
    width, block = layout
    codes, scales = blocked(_row_codes(module), module.scale.numpy(), width, block)
    inputs = [x, built.add("qweight", codes), built.add("scales", scales.reshape(-1))]
    if module.bias is not None:
        inputs += ["", "", built.add("bias", module.bias.numpy())]
    attrs = {"K": module.in_features, "N": module.out_features, "bits": width, "block_size": block}
    built.node("MatMulNBits", inputs, y, domain=MSFT, accuracy_level=4 if int8 else 0, **attrs)
    activations = "int8 activations quantised on the fly (accuracy_level 4)" if int8 else "fp32 activations"
    kernel = f"MatMulNBits ({width}-bit blocks of {block}, {activations})"
    built.describe(module, f"{MSFT}.MatMulNBits", width, kernel, low_bit=True)
    return built


def _runtime_int8(module: PackedLinear) -> bool:
    """Whether ORT's DynamicQuantizeMatMul can run the layer: 5-8-bit codes with one scale per output channel,
    weight-only or with dynamic activations (static activation scales keep the exact int8 kernel)."""
    one_scale = module.scale.shape[1] == 1
    return one_scale and module.bits > 4 and (module.kernel != INT_KERNEL or bool(module.act_dynamic))


def _dynamic_int8_linear(module: PackedLinear, built: Built, x: str, y: str) -> Built:
    """ORT's own dynamic int8 kernel (one fused DynamicQuantizeMatMul: x quantised per tensor to uint8 at run
    time, u8 x u8 GEMM with the weights shifted around 128, rescaled by x's scale and the per-channel weight
    scales, bias added)."""
    weight = built.add("qweight_t", _unsigned_codes(module))
    inputs = [x, weight, built.add("weight_scale", module.scale[:, 0].numpy().astype(np.float32))]
    inputs.append(built.add("weight_zero_point", np.array(128, np.uint8)))
    if module.bias is not None:
        inputs.append(built.add("bias", module.bias.numpy()))
    built.node("DynamicQuantizeMatMul", inputs, y, domain=MSFT)
    kernel = "DynamicQuantizeMatMul (per-tensor uint8 activations quantised at run time by ORT x int8 weights)"
    built.describe(module, f"{MSFT}.DynamicQuantizeMatMul", 8, kernel, low_bit=True)
    return built


def _unsigned_codes(module: PackedLinear) -> np.ndarray:
    """The weight codes transposed to (in, out) and shifted to uint8 around the zero point 128: ORT's u8 x u8
    integer GEMM is exact everywhere, its u8 x s8 one saturates on AVX2 without VNNI (see the module's notes)."""
    return (_row_codes(module).T.astype(np.int16) + 128).astype(np.uint8)


def _int8_linear(module: PackedLinear, built: Built, x: str, y: str) -> Built:
    """The int8 kernel: x quantised as PyTorch does (divide by the static or per-row scale, round half to even,
    clamp to +-127), x and the weights shifted to uint8 around 128, u8 x u8 GEMM (exact on every CPU), rescaled
    by act scale x weight scale, bias added."""
    if module.act_dynamic:
        act_scale = _row_scales(built, x)
    else:
        act_scale = built.add("act_scale", module.act_scale.reshape(()).numpy().astype(np.float32))
    steps = built.node("Round", [built.node("Div", [x, act_scale])])
    limits = [built.add("act_min", np.float32(-ACT_QMAX)), built.add("act_max", np.float32(ACT_QMAX))]
    shifted = built.node("Add", [built.node("Clip", [steps, *limits]), built.add("act_offset", np.float32(128))])
    codes = built.node("Cast", [shifted], to=TensorProto.UINT8)
    zero = built.add("act_zero_point", np.array(128, np.uint8))
    weight = built.add("qweight_t", _unsigned_codes(module))
    weight_zero = built.add("weight_zero_point", np.array(128, np.uint8))
    product = built.node("MatMulInteger", [codes, weight, zero, weight_zero])
    acc = built.node("Cast", [product], to=TensorProto.FLOAT)
    if module.act_dynamic:  # row scales first, never their product with the channel scales (see above)
        rows = built.node("Mul", [acc, act_scale])
        scaled = built.node("Mul", [rows, built.add("weight_scale", module.scale[:, 0].numpy())])
    else:
        scaled = built.node("Mul", [acc, built.add("rescale", (module.act_scale * module.scale[:, 0]).numpy())])
    _add_bias(built, module, scaled, y)
    how = "dynamic per-row" if module.act_dynamic else "static"
    kernel = f"MatMulInteger ({how} uint8 activations x int8 weights stored as uint8 -> int32)"
    built.describe(module, "MatMulInteger", 8, kernel, low_bit=True)
    return built


def _row_scales(built: Built, x: str) -> str:
    """Per-row scales of x (shape [..., 1]) as `techniques.packed.row_scales` computes them: max|row| / 127,
    1 for an all-zero row."""
    axis = built.add("row_axis", np.array([-1], np.int64))
    amax = built.node("ReduceMax", [built.node("Abs", [x]), axis], keepdims=1)
    scaled = built.node("Div", [amax, built.add("act_qmax", np.float32(ACT_QMAX))])
    positive = built.node("Greater", [amax, built.add("act_zero", np.float32(0))])
    return built.node("Where", [positive, scaled, built.add("act_one", np.float32(1))])


def conv_weight(module: PackedConv2d, name: str, y: str) -> Built:
    """Nodes producing the float32 weight `y` of a packed Conv2d from its low-bit (or float16) storage."""
    built = Built(name)
    if module.bits in FLOAT_BITS:
        decoded = module.decode_weight().numpy()
        weight = built.add("weight", decoded.astype(np.float16) if module.bits == 16 else decoded)
        if module.bits == 16:
            built.node("Cast", [weight], y, to=TensorProto.FLOAT)
        else:
            built.node("Identity", [weight], y)
        kernel = "Conv (fp32)" if module.bits == 32 else f"Conv ({AT_LOAD})"
        built.describe(module, "Conv", module.bits, kernel, low_bit=False)
        return built
    built.node("Identity", [_folded_weight(built, module, transpose=False)], y)
    width = 4 if module.bits <= 4 else 8
    built.describe(module, "Conv", width, f"Conv ({AT_LOAD}; ORT has no low-bit convolution)", low_bit=False)
    return built


def embedding(module: PackedEmbedding, name: str, ids: str, y: str) -> Built:
    """Nodes computing `y = table[ids]` for a packed embedding, dequantizing only the gathered rows."""
    built = Built(name)
    if module.bits == 16:
        rows = built.node("Gather", [built.add("weight", module.values.numpy()), ids])
        built.node("Cast", [rows], y, to=TensorProto.FLOAT)
        built.describe(module, "Gather", 16, "Gather (float16 rows cast to fp32)", low_bit=False)
        return built
    codes = unpack_rows(module.values, module.bits, module.embedding_dim).numpy().astype(np.int32)
    width = next(w for w in GATHER_WIDTHS if w >= module.bits)
    block = block_size(module.embedding_dim, module.scale.shape[1], width)
    if block is None or (module.embedding_dim * width) % 8:
        return _gathered_embedding(module, built, codes, ids, y)
    packed, per_block = blocked(codes, module.scale.numpy(), width, block)
    table = built.add("qweight", packed.reshape(module.num_embeddings, -1)[:, : module.embedding_dim * width // 8])
    attrs = {"bits": width, "block_size": block, "gather_axis": 0, "quantize_axis": 1}
    built.node("GatherBlockQuantized", [table, ids, built.add("scales", per_block)], y, domain=MSFT, **attrs)
    kernel = f"GatherBlockQuantized ({width}-bit rows; dequantizes the gathered rows only)"
    built.describe(module, f"{MSFT}.GatherBlockQuantized", width, kernel, low_bit=True)
    return built


def _gathered_embedding(module: PackedEmbedding, built: Built, codes: np.ndarray, ids: str, y: str) -> Built:
    """Gather int8 codes and their scales, multiply, and restore the (..., embedding_dim) row shape."""
    groups = module.scale.shape[1]
    table = codes.reshape(module.num_embeddings, groups, -1).astype(np.int8)
    rows = built.node("Cast", [built.node("Gather", [built.add("qweight", table), ids])], to=TensorProto.FLOAT)
    scales = built.node("Gather", [built.add("scales", module.scale.numpy()[:, :, None]), ids])
    product = built.node("Mul", [rows, scales])
    dim = built.add("dim", np.array([module.embedding_dim], np.int64))
    shape = built.node("Concat", [built.node("Shape", [ids]), dim], axis=0)
    built.node("Reshape", [product, shape], y)
    kernel = "Gather of int8 codes and scales, then Mul (dequantizes the gathered rows only)"
    why = "GatherBlockQuantized cannot take this row length or group size"
    built.describe(module, "Gather", 8, kernel, why, low_bit=True)
    return built

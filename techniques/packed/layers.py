"""Packed Linear/Conv2d layers as deployed, and the quantisation arithmetic they, fake-quant and
`techniques.packed.embedding` share.

Decisions:
- Weights are quantised symmetrically: per output channel, or per group of `group_size` consecutive
  elements of each flattened output row; scale = max|w| / (2^(b-1)-1) (1.0 for an all-zero group),
  codes = round(w / scale) clamped to +-(2^(b-1)-1); the weight is `codes * scale` in float32. A calibrated
  algorithm (GPTQ, techniques.gptq) chooses its own scales, which are passed in frozen and used as they are.
  Fake-quant (techniques.quantization) calls the same functions, so decoding a packed layer reproduces the
  weights the model was fine-tuned with bitwise.
- Storage: `values` holds b-bit codes packed into uint8 (bits <= 8), float16 values (bits=16) or float32
  values (bits=32: pruned, not quantised). With `sparse`, a 1-bit `mask` is stored and `values` only
  holds the kept positions. `scale` is float32 (out, groups); `bias` and `act_scale` are float32.
  Decoded weights are cached in non-persistent buffers, so the artifact holds only the packed form.
- Activations (act_bits=8) are quantised per tensor with a static scale: round(x / s) clamped to +-127; with
  `act_dynamic` (a Linear only) per row instead, at run time: every row of the input's last dimension (a token
  of a transformer) gets s = max|row| / 127 (1.0 for an all-zero row), so one outlier token costs only its own
  row's precision and no calibration is needed. Fake-quant calls the same `quantize_rows`.
- Kernel: a PackedLinear with 8-bit per-channel weights, 8-bit activations and kernel="auto" runs
  `torch._int_mm` (int8 x int8 -> int32) and rescales by act_scale * w_scale (dynamic: by the row scales, then
  the channel scales); everything else decodes once and runs float32. On CUDA, `_int_mm` needs K and N to be
  multiples of 8 and more than 16 rows (rows are padded with zero rows, for dynamic scales too; untested here
  for want of a GPU); layers that cannot fall back to float32 and `kernel_reason` says why. Packed layers are
  for inference: the integer path carries no autograd graph.
- A smoothed PackedLinear (`smoothed`, techniques.smoothing: SmoothQuant/AWQ) multiplies its input by the stored
  per-input-channel `input_scale` (1/s; the codes are those of W·diag(s)) before anything else, as fake-quant's
  smoothing hook did, so the product is bitwise the same.
- Export hooks (`decode_codes`, `decode_weight`, `export_forward`) redo the forward arithmetic from the packed
  buffers on every call with tensor operations only, so a torch.export program keeps the packed form and
  decodes inside its graph; `forward` keeps its caches. Exports swap `forward` for `export_forward` on a copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from techniques._base import RebuildableModule, rebuildable
from techniques.packed.bits import (
    code_range,
    pack_bits,
    pack_mask,
    packed_nbytes,
    popcount,
    split_bytes,
    unpack_bits,
    unpack_mask,
    unpack_rows,
)

ACT_QMAX = 127
INT_KERNEL = "int8_int_mm"
DEQUANT_KERNEL = "dequantized-fp32"
FLOAT_BITS = (16, 32)
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]  # nn.Conv2d's padding modes


def _pair(values: Sequence[int]) -> tuple[int, int]:
    """`tuple(values)`, typed as the pair nn.Conv2d's signature asks for (a 2-d convolution's geometry)."""
    return cast(tuple[int, int], tuple(values))


def symmetric_scale(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """max|values| / (2^(bits-1)-1) along `dim` (kept), 1.0 where all are zero: the scale of a weight group."""
    amax = values.abs().amax(dim=dim, keepdim=True)
    return torch.where(amax > 0, amax / code_range(bits), torch.ones_like(amax))


def weight_codes(
    weight: torch.Tensor, bits: int, group_size: int | None, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float32 of shape (out, groups, group), scale of shape (out, groups, 1)) of `weight`.

    `scale` (out, groups), when given, is used as it is (scales a calibrated algorithm such as GPTQ chose);
    otherwise each group's `symmetric_scale` is computed from the weight (round to nearest).
    """
    rows = weight.reshape(weight.shape[0], -1)
    grouped = rows.reshape(rows.shape[0], -1, group_size or rows.shape[1])
    qmax = code_range(bits)
    scale = symmetric_scale(grouped, bits) if scale is None else scale.reshape(grouped.shape[0], -1, 1)
    return torch.round(grouped / scale).clamp(-qmax, qmax), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The float32 weight `codes * scale` (grouped shapes as `weight_codes` returns them) in `shape`."""
    return (codes * scale).reshape(shape)


def quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer codes (as float) of 8-bit activation quantisation with `scale` (per tensor, or broadcast per row)."""
    return torch.div(x, scale).round_().clamp_(-ACT_QMAX, ACT_QMAX)


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-row activation scales, shape (..., 1): max|row| / 127 over the last dim, 1.0 for a zero row."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax / ACT_QMAX, torch.ones_like(amax))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes as float, per-row scales) of dynamic 8-bit per-row quantisation of `x`."""
    scale = row_scales(x)
    return quantize_activation(x, scale), scale


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` through dynamic 8-bit per-row quantisation and back to float (what the integer kernel computes on)."""
    codes, scale = quantize_rows(x)
    return codes * scale


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_storage(shape: tuple[int, ...], bits: Any, group_size: Any, sparse: Any, nnz: Any, act_bits: Any) -> None:
    """The storage a (hand-editable) rebuild config describes is one this module can decode (ValueError if not)."""
    numel = math.prod(shape)
    if not shape or not all(_is_int(size, 1) for size in shape):
        raise ValueError(f"weight shape must be positive integers, got {list(shape)}")
    if not _is_int(bits, 2) or not (bits <= 8 or bits in FLOAT_BITS):
        raise ValueError(f"bits must be an integer in [2, 8], 16 or 32, got {bits!r}")
    if group_size is not None and (not _is_int(group_size, 1) or (numel // shape[0]) % group_size):
        raise ValueError(f"group_size {group_size!r} does not divide a weight row of {numel // shape[0]}")
    if not isinstance(sparse, bool) or not _is_int(nnz, 0) or nnz > numel or (not sparse and nnz != numel):
        raise ValueError(f"sparse={sparse!r} with nnz={nnz!r} does not describe {numel} weights")
    if act_bits not in (None, 8) or isinstance(act_bits, bool):
        raise ValueError(f"act_bits must be 8 or null, got {act_bits!r}")


class PackedLayer(RebuildableModule):
    """Storage, decoding and activation quantisation shared by PackedLinear and PackedConv2d."""

    # Registered buffers (`scale` only for quantised codes, `mask` only when sparse, `act_scale` only with
    # static act_bits); the last two are non-persistent decode caches.
    values: torch.Tensor
    scale: torch.Tensor
    mask: torch.Tensor
    bias: torch.Tensor | None
    act_scale: torch.Tensor
    _dense: torch.Tensor | None
    _wt_int8: torch.Tensor | None

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        *,
        bits: int,
        group_size: int | None = None,
        sparse: bool = False,
        nnz: int | None = None,
        has_bias: bool = True,
        act_bits: int | None = None,
        act_dynamic: bool = False,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if act_dynamic is not False and (act_dynamic is not True or act_bits != 8):
            raise ValueError(f"act_dynamic must be a bool, and true only with act_bits=8; got {act_dynamic!r}")
        self.weight_shape = tuple(weight_shape)
        self.bits = bits
        self.group_size = group_size
        self.sparse = sparse
        self.act_bits = act_bits
        self.act_dynamic = act_dynamic
        self.requested_kernel = kernel
        numel = math.prod(self.weight_shape)
        self.nnz = numel if nnz is None else nnz
        _check_storage(self.weight_shape, bits, group_size, sparse, self.nnz, act_bits)
        count = self.nnz if sparse else numel
        if bits in FLOAT_BITS:
            self.register_buffer("values", torch.zeros(count, dtype=torch.float16 if bits == 16 else torch.float32))
        else:
            self.register_buffer("values", torch.zeros(packed_nbytes(count, bits), dtype=torch.uint8))
            row = numel // self.weight_shape[0]
            self.register_buffer("scale", torch.ones(self.weight_shape[0], row // (group_size or row)))
        if sparse:
            self.register_buffer("mask", torch.zeros(packed_nbytes(numel, 1), dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(self.weight_shape[0]) if has_bias else None)
        if act_bits is not None and not act_dynamic:
            self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("_dense", None, persistent=False)
        self.register_buffer("_wt_int8", None, persistent=False)
        self._plan: tuple[torch.device, bool] | None = None  # (device, runs the integer kernel)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        *,
        bits: int,
        group_size: int | None,
        mask: torch.Tensor | None,
        bias: torch.Tensor | None,
        act_scale: torch.Tensor | None,
        kernel: str,
        act_dynamic: bool = False,
        scale: torch.Tensor | None = None,
        **layer: Any,
    ) -> PackedLayer:
        """Pack `weight` (masked, not yet quantised); the mask is dropped when it would not save bytes.
        `act_scale`: the static activation scale; `act_dynamic`: activations quantised per row at run time;
        `scale`: frozen (out, groups) weight scales to pack with (e.g. GPTQ's), else computed from the weight."""
        numel = weight.numel()
        keep = None if mask is None else mask.expand_as(weight).reshape(-1)
        nnz = numel if keep is None else int(keep.sum())
        sparse_bytes = packed_nbytes(numel, 1) + packed_nbytes(nnz, bits)
        sparse = keep is not None and sparse_bytes < packed_nbytes(numel, bits)
        module = cls(
            **layer,
            bits=bits,
            group_size=group_size,
            sparse=sparse,
            nnz=nnz if sparse else None,
            has_bias=bias is not None,
            act_bits=None if act_scale is None and not act_dynamic else 8,
            act_dynamic=act_dynamic,
            kernel=kernel,
        )
        with torch.no_grad():
            weight = weight.detach().float()
            if bits in FLOAT_BITS:
                flat = weight.reshape(-1).to(module.values.dtype)
            else:
                codes, chosen = weight_codes(weight, bits, group_size, scale)
                module.scale.copy_(chosen.squeeze(2))
                flat = codes.reshape(-1).to(torch.int32)
            if sparse and keep is not None:  # sparse implies a mask
                module.mask.copy_(pack_mask(keep))
                flat = flat[keep]
            module.values.copy_(flat if bits in FLOAT_BITS else pack_bits(flat, bits))
            if bias is not None and module.bias is not None:  # the module was built with has_bias
                module.bias.copy_(bias.detach())
            if act_scale is not None:
                module.act_scale.copy_(act_scale)
        return module.to(weight.device)

    def _layer_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def rebuild_config(self) -> dict[str, Any]:
        """JSON-safe arguments that rebuild an empty module with this one's state_dict keys and shapes."""
        return {
            **self._layer_config(),
            "bits": self.bits,
            "group_size": self.group_size,
            "sparse": self.sparse,
            "nnz": self.nnz,
            "has_bias": self.bias is not None,
            "act_bits": self.act_bits,
            "act_dynamic": self.act_dynamic,
            "kernel": self.requested_kernel,
        }

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        errors: list[str] = args[-1]  # (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        reported = len(errors)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._dense = self._wt_int8 = self._plan = None
        if self.sparse and len(errors) == reported and f"{prefix}mask" in state_dict:
            kept = popcount(self.mask)  # the mask must place exactly the values stored, or decoding fails
            if kept != self.nnz:
                raise ValueError(f"{prefix}mask keeps {kept} weights where the layer records {self.nnz}")

    def _decode_flat(self) -> torch.Tensor:
        """All weight values (float32 or int8 codes), zeros at masked positions, as a flat tensor."""
        numel = math.prod(self.weight_shape)
        if self.bits in FLOAT_BITS:
            values = self.values.float()
        else:
            values = unpack_bits(self.values, self.bits, self.nnz if self.sparse else numel)
        if not self.sparse:
            return values
        full = values.new_zeros(numel)
        full[unpack_mask(self.mask, numel)] = values
        return full

    def dense_weight(self) -> torch.Tensor:
        """The decoded float32 weight, computed once and cached (not part of the state_dict)."""
        if self._dense is None:
            self._dense = self._decode_dense()
        return self._dense

    @torch.inference_mode(False)
    @torch.no_grad()
    def _decode_dense(self) -> torch.Tensor:
        # Decoded outside inference mode, so a cache filled during a latency run stays usable with autograd.
        flat = self._decode_flat()
        if self.bits not in FLOAT_BITS:
            codes = flat.float().view(self.weight_shape[0], self.scale.shape[1], -1)
            flat = dequantize(codes, self.scale.unsqueeze(2), self.weight_shape)
        return flat.reshape(self.weight_shape)

    def drop_caches(self) -> None:
        """Forget the decoded weights and the kernel plan; the next forward decodes again (an export copies the
        packed form alone)."""
        self._dense = self._wt_int8 = self._plan = None

    def decode_codes(self) -> torch.Tensor:
        """The integer weight codes (an integer tensor, zero at masked positions) in `weight_shape`, decoded on
        every call.

        An export hook, like `decode_weight` and `export_forward`: tensor operations on the packed buffers only
        (no cache, no mode switch), so a torch.export program keeps the packed form and decodes in its graph.
        """
        numel = math.prod(self.weight_shape)
        count = self.nnz if self.sparse else numel
        if 8 % self.bits == 0:
            codes = split_bytes(self.values, self.bits)[:count]
        else:
            codes = unpack_rows(self.values.view(1, -1), self.bits, count).view(-1)
        if self.sparse:
            codes = codes.new_zeros(numel).masked_scatter(unpack_mask(self.mask, numel), codes)
        return codes.view(self.weight_shape)

    def decode_weight(self) -> torch.Tensor:
        """The float32 weight `dense_weight()` caches, decoded from the packed buffers on every call (an export
        hook: see `decode_codes`)."""
        if self.bits in FLOAT_BITS:
            numel = math.prod(self.weight_shape)
            values = self.values.float()
            if self.sparse:
                values = values.new_zeros(numel).masked_scatter(unpack_mask(self.mask, numel), values)
            return values.view(self.weight_shape)
        codes = self.decode_codes().float().view(self.weight_shape[0], self.scale.shape[1], -1)
        return dequantize(codes, self.scale.unsqueeze(2), self.weight_shape)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer's activation quantisation leaves it, in float (the fallback path)."""
        if self.act_bits is None:
            return x
        if self.act_dynamic:
            return fake_quantize_rows(x)
        return quantize_activation(x, self.act_scale) * self.act_scale

    def _input_codes(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes, scale) of the (rows, in) input: scale () when static, (rows, 1) when dynamic."""
        if self.act_dynamic:
            codes, scale = quantize_rows(rows)
        else:
            codes, scale = quantize_activation(rows, self.act_scale), self.act_scale
        return codes.to(torch.int8), scale

    @property
    def kernel_reason(self) -> str | None:
        """Why this layer does not run an integer kernel on its current device (None when it does)."""
        return "integer kernels are implemented for Linear layers only"

    @property
    def kernel(self) -> str:
        """Which kernel the forward pass runs: INT_KERNEL or DEQUANT_KERNEL."""
        return INT_KERNEL if self.kernel_reason is None else DEQUANT_KERNEL


@rebuildable
class PackedLinear(PackedLayer):
    """A Linear layer with packed (quantised and/or sparse) weights; see the module docstring."""

    input_scale: torch.Tensor  # registered buffer when `smoothed`: 1/s per input channel

    def __init__(self, in_features: int, out_features: int, *, smoothed: bool = False, **storage: Any) -> None:
        super().__init__((out_features, in_features), **storage)
        if not isinstance(smoothed, bool):
            raise ValueError(f"smoothed must be a bool, got {smoothed!r}")
        self.in_features, self.out_features, self.smoothed = in_features, out_features, smoothed
        if smoothed:
            self.register_buffer("input_scale", torch.ones(in_features))

    def _layer_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "smoothed": self.smoothed}

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        """The input times the smoothing scales 1/s (techniques.smoothing), before anything else; as it is when the
        layer is not smoothed."""
        return x * self.input_scale if self.smoothed else x

    @property
    def kernel_reason(self) -> str | None:
        if self.requested_kernel != "auto":
            return f"kernel={self.requested_kernel!r} requested"
        if self.bits != 8 or self.act_bits != 8:
            return f"needs 8-bit weights and activations, has bits={self.bits}, act_bits={self.act_bits}"
        if self.group_size is not None:
            return "grouped weight scales do not factor out of an integer GEMM"
        device = self.values.device.type
        if device == "cuda" and (self.in_features % 8 or self.out_features % 8):
            return "torch._int_mm on CUDA needs in_features and out_features to be multiples of 8"
        if device not in ("cpu", "cuda"):
            return f"torch._int_mm is not available on {device}"
        return None

    def _int_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._wt_int8 is None:
            with torch.inference_mode(False):
                self._wt_int8 = self._decode_flat().view(self.weight_shape).t()
        rows = x.reshape(-1, self.in_features)
        codes, act_scale = self._input_codes(rows)
        pad = 17 - codes.shape[0] if codes.is_cuda and codes.shape[0] <= 16 else 0
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
        acc = torch._int_mm(codes, self._wt_int8)[: rows.shape[0]]
        return self._rescale(acc, act_scale).reshape(*x.shape[:-1], self.out_features)

    def _rescale(self, acc: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
        """float32 `acc * (act_scale * w_scale) + bias` for a static act_scale (); `(acc * row_scale) * w_scale +
        bias` for per-row (rows, 1) scales, in the order the ONNX graph multiplies them."""
        if self.act_dynamic:
            acc, rescale = acc * act_scale, self.scale[:, 0]
        else:
            rescale = act_scale * self.scale[:, 0]
        # int32 * float32 promotes to float32 inside the kernel, saving a converted copy of `acc`.
        return acc * rescale if self.bias is None else torch.addcmul(self.bias, acc, rescale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._plan is None or self._plan[0] != x.device:  # decided once per device, not per call
            self._plan = (x.device, self.kernel_reason is None)
        x = self._smooth(x)
        if self._plan[1]:
            return self._int_forward(x)
        return F.linear(self._quantize_input(x), self.dense_weight(), self.bias)

    def export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for torch.export: the same arithmetic (int8 kernel included), decoding the packed buffers in
        the graph on every call instead of caching float32 weights that the exported program would then hold.
        Traced on the CPU: the CUDA row padding of `_int_forward` is left out."""
        x = self._smooth(x)
        if self.kernel_reason is not None:
            return F.linear(self._quantize_input(x), self.decode_weight(), self.bias)
        codes, act_scale = self._input_codes(x.reshape(-1, self.in_features))
        acc = torch._int_mm(codes, self.decode_codes().t())
        return self._rescale(acc, act_scale).reshape(*x.shape[:-1], self.out_features)


@rebuildable
class PackedConv2d(PackedLayer):
    """A Conv2d layer with packed (quantised and/or sparse) weights; runs a decoded float32 convolution."""

    # Geometry copied from a weightless nn.Conv2d in __init__ (typed as nn.Conv2d types them).
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: PaddingMode

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: list[int] | tuple[int, int],
        *,
        stride: list[int] | tuple[int, int] = (1, 1),
        padding: str | list[int] | tuple[int, int] = (0, 0),
        dilation: list[int] | tuple[int, int] = (1, 1),
        groups: int = 1,
        padding_mode: PaddingMode = "zeros",
        **storage: Any,
    ) -> None:
        if storage.get("act_dynamic"):
            raise ValueError("dynamic per-row activation quantisation is implemented for Linear layers only")
        # A weightless Conv2d on the meta device validates the geometry and works out non-zero padding.
        geometry = nn.Conv2d(
            in_channels,
            out_channels,
            _pair(kernel_size),
            _pair(stride),
            padding if isinstance(padding, str) else _pair(padding),
            _pair(dilation),
            groups,
            bias=False,
            padding_mode=padding_mode,
            device="meta",
        )
        super().__init__(tuple(geometry.weight.shape), **storage)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, attr, getattr(geometry, attr))
        self.padding_mode = padding_mode
        self._pad_twice = geometry._reversed_padding_repeated_twice

    @classmethod
    def like(cls, conv: nn.Conv2d | PackedConv2d) -> dict[str, Any]:
        """Constructor arguments describing `conv`'s geometry."""
        return {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation),
            "groups": conv.groups,
            "padding_mode": conv.padding_mode,
        }

    def _layer_config(self) -> dict[str, Any]:
        return PackedConv2d.like(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_twice, mode=self.padding_mode)
            padding = (0, 0)
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, padding, self.dilation, self.groups)

    def export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for torch.export, decoding the packed weight in the graph on every call (see PackedLinear)."""
        x = self._quantize_input(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_twice, mode=self.padding_mode)
            padding = (0, 0)
        return F.conv2d(x, self.decode_weight(), self.bias, self.stride, padding, self.dilation, self.groups)

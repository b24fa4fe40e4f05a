"""Fake quantisation: the modules that make a float model compute as its quantised form will.

`WeightFakeQuant` is the parametrisation on a quantised layer's weight (symmetric codes times scales, recomputed
on every forward or frozen by a calibrated algorithm), `ActivationFakeQuant` the static per-tensor 8-bit input
quantiser (observing max|x| during calibration), `DynamicActivationFakeQuant` the per-row one; gradients pass
straight through all of them. The arithmetic is `techniques.packed.layers`'s, so `finalize` reproduces them bitwise;
`techniques.quantization` attaches them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from techniques.packed.layers import ACT_QMAX, dequantize, fake_quantize_rows, quantize_activation, weight_codes


class _StraightThrough(torch.autograd.Function):
    """Forward `fn(x)` exactly; backward passes the gradient to `x` unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def per_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """A static 8-bit activation scale from max|x|: amax / 127 (1.0 when nothing non-zero was seen)."""
    return torch.where(amax > 0, amax / ACT_QMAX, torch.ones_like(amax))


class WeightFakeQuant(nn.Module):
    """Parametrisation: the weight as symmetric `bits`-bit codes times float32 scales (float16 at 16 bits).

    Scales are recomputed from the weight on every forward (round to nearest), or, when `scale` (out, groups)
    is given, frozen: a calibrated algorithm's (GPTQ's) scales, a buffer that `finalize` packs with.
    """

    scale: torch.Tensor | None  # registered buffer (None: recomputed from the weight)

    def __init__(
        self, bits: int, group_size: int | None = None, kernel: str = "auto", scale: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self.kernel = kernel
        self.register_buffer("scale", None if scale is None else scale.detach().float().clone())

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantised weight, without gradient bookkeeping."""
        if self.bits == 16:
            return weight.half().float()
        codes, scale = weight_codes(weight, self.bits, self.group_size, self.scale)
        return dequantize(codes, scale, weight.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(weight, self.quantize)

    def extra_repr(self) -> str:
        frozen = ", frozen scales" if self.scale is not None else ""
        return f"bits={self.bits}, group_size={self.group_size}{frozen}"


class ActivationFakeQuant(nn.Module):
    """8-bit static per-tensor fake-quant of a layer's input; records max|x| while `observing`."""

    bits = 8
    scale: torch.Tensor  # registered buffers
    amax: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("amax", torch.zeros(()))
        self.observing = False

    def freeze(self) -> None:
        """Stop observing; the scale becomes max|x| / 127 (1.0 when nothing non-zero was seen)."""
        self.scale.copy_(per_tensor_scale(self.amax))
        self.observing = False

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activation(x, self.scale) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.amax.copy_(torch.maximum(self.amax, x.detach().abs().amax().float()))
            return x
        return _StraightThrough.apply(x, self.quantize)


class DynamicActivationFakeQuant(nn.Module):
    """8-bit dynamic per-row fake-quant of a Linear's input (scales from each row at run time; nothing to
    calibrate); gradients pass straight through."""

    bits = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(x, fake_quantize_rows)


def quantize_input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: pass the layer's first input through its `input_quant`."""
    return (cast(nn.Module, module.input_quant)(args[0]), *args[1:])

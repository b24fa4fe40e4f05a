"""Activation-aware smoothing: per-input-channel scales s moved from a Linear's inputs into its weight.

y = W x = (W·diag(s)) (x / s): exact before quantisation; chosen well, the scaled weight and the scaled inputs
quantise with less error than the originals. Two ways of choosing s, from statistics of each Linear's inputs
collected in one calibration pass of the model (`techniques.quantization` wires them in, `smoothing` setting):

- SmoothQuant (Xiao et al. 2022; mit-han-lab/smoothquant `smooth.py` `smooth_ln_fcs`, llm-compressor's
  SmoothQuantModifier): s_j = max|X_j|^α / max|W_:,j|^(1-α), α the migration strength (0.5 the paper's default),
  both maxima clamped at 1e-5 as the reference clamps them. For w8a8: outlier input channels (a few channels of
  a transformer's activations are 10-100x the others) move into the weight, whose per-channel scales absorb them.
- AWQ (Lin et al. 2023; mit-han-lab/llm-awq `auto_scale.py` `_search_module_scale`, AutoAWQ `quantizer.py`
  `_search_best_scale` with duo_scaling off): s = mean|x|^α normalised by sqrt(max(s)·min(s)), α from a grid of
  AWQ_GRID points in [0, 1) minimising the mean squared error of the layer's output, Q(W·diag(s))·(x/s) against
  W·x, on a sample of its calibration inputs, with Q the layer's round-to-nearest quantisation (and its activation
  quantisation where it has one). α = 0 gives s = 1: round to nearest, which the search therefore never loses to.

Decisions:
- The scale is *inserted*, not folded: each smoothed Linear gets an `InputSmoothing` (x * (1/s), a buffer) run by a
  forward pre-hook before its activation quantiser, and its stored weight becomes W·diag(s). The references fold 1/s
  into the preceding LayerNorm, which is exact only where that LayerNorm feeds nothing else: in pre-LN decoders
  (OPT, Llama: the residual is taken before the norm) for q/k/v and fc1. In a post-LN BERT every LayerNorm output is
  also the next residual, so folding there changes the model; only attention.output.dense could fold (into the
  value projection: attention is linear in V) and the FFN's second Linear sits behind a GELU, where llm-awq too
  inserts a `ScaledActivation`. One Mul per layer works for every architecture; folding is not done.
- Scales are per layer (q, k and v each get their own), where the references share one per LayerNorm because the
  fold forces it: an inserted scale need not, and each layer's own is at least as good for its own error.
- Channels never active in calibration (max|X_j| = 0) get s = 1 where the reference's clamp gives 1e-5: an input
  that appears only at run time would otherwise be multiplied by 1e5 and swamp the activation scale. A weight column
  that is all zero gets s = max|X_j| (llm-compressor's choice): the input is irrelevant to the output, so it is
  scaled to at most 1 and stops setting the activation range.
- AWQ's grid search sees at most SAMPLE_ROWS input rows per layer (the first ones calibration gives); mean|x| and
  max|x| see every row. Weight clipping (llm-awq's `auto_clip`) is not done.
- With GPTQ after smoothing (`algorithm: "gptq"`, as GPTQModel and llm-compressor chain them) the Hessian of the
  scaled inputs is diag(1/s) H diag(1/s), computed from the one calibration pass (`scaled_hessian`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

SMOOTHQUANT, AWQ = "smoothquant", "awq"
METHODS = (SMOOTHQUANT, AWQ)
ALPHA = 0.5  # SmoothQuant's default migration strength
AWQ_GRID = 20  # llm-awq's n_grid: α in {0, 0.05, ..., 0.95}
MIN_SCALE = 1e-5  # SmoothQuant's clamp on max|W_j| and on s
AWQ_MIN_SCALE = 1e-4  # llm-awq's clamp on mean|x|^α
SAMPLE_ROWS = 2048  # input rows per layer kept for AWQ's grid search

Quantizer = Callable[[torch.Tensor], torch.Tensor]


class InputSmoothing(nn.Module):
    """x * (1/s) per input channel (the last dimension), before a smoothed layer's activation quantiser."""

    scale: torch.Tensor  # registered buffer: 1/s

    def __init__(self, inverse: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", inverse.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def smooth_input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: pass the layer's first input through its `input_smoothing`."""
    return (cast(nn.Module, module.input_smoothing)(args[0]), *args[1:])


def install(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Smooth a Linear in place: `weight` (the tensor it stores, before any masks) becomes W·diag(s) and its inputs
    are multiplied by 1/s before anything else its pre-hooks do (the hook must be the first one registered)."""
    with torch.no_grad():
        weight.mul_(scale.to(weight.dtype).view(1, -1))
    module.input_smoothing = InputSmoothing(1.0 / scale).to(weight.device)
    module.register_forward_pre_hook(smooth_input_hook)


# --------------------------------------------------------------------------- calibration statistics


@dataclass
class InputStats:
    """What smoothing needs of one layer's inputs: per-channel max|x| and mean|x|, and a sample of rows."""

    amax: torch.Tensor
    mean: torch.Tensor
    sample: torch.Tensor | None


class _Recorder:
    def __init__(self, module: nn.Module, sample_rows: int) -> None:
        self.module, self.sample_rows = module, sample_rows
        self.amax: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.rows = 0
        self.kept: list[torch.Tensor] = []

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1]).float()
        absolute = rows.abs()
        amax, total = absolute.amax(dim=0), absolute.sum(dim=0)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.total = total if self.total is None else self.total + total
        self.rows += rows.shape[0]
        room = self.sample_rows - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(rows[:room].clone())

    def stats(self) -> InputStats | None:
        if self.amax is None or self.total is None or not self.rows:
            return None
        sample = torch.cat(self.kept) if self.kept else None
        return InputStats(self.amax, self.total / self.rows, sample)


@contextmanager
def statistics_hooks(
    layers: Mapping[str, nn.Module], sample_rows: int = 0
) -> Iterator[Callable[[], dict[str, InputStats | None]]]:
    """While open, record each Linear's inputs; yields a function returning name -> InputStats (None for a layer
    that saw no input). `sample_rows`: how many input rows to keep per layer (AWQ's search needs them)."""
    recorders = {name: _Recorder(module, sample_rows) for name, module in layers.items()}
    handles = [r.module.register_forward_pre_hook(r.hook) for r in recorders.values()]
    try:
        yield lambda: {name: r.stats() for name, r in recorders.items()}
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- the scales


def smoothquant_scales(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s (in_features,) of a (out, in) weight: max|X_j|^α / max|W_:,j|^(1-α), clamped at MIN_SCALE;
    1 for inputs never seen, max|X_j| for all-zero weight columns (see the module's Decisions)."""
    act = act_amax.float()
    weight_max = weight.detach().abs().amax(dim=0).float()
    scale = (act.pow(alpha) / weight_max.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)
    scale = torch.where(weight_max > 0, scale, act.clamp(min=MIN_SCALE))
    return torch.where(act > 0, scale, torch.ones_like(scale))


def awq_scales(mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's candidate s for exponent α: mean|x|^α clamped at AWQ_MIN_SCALE, over sqrt(max(s)·min(s))."""
    scale = mean.float().pow(alpha).clamp(min=AWQ_MIN_SCALE)
    return scale / (scale.max() * scale.min()).sqrt()


def smoothed_error(
    weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, quantize: Quantizer, quantize_input: Quantizer | None
) -> float:
    """Mean squared error of Q(W·diag(s))·q(x/s) against W·x over the rows of `x` (no bias: it cancels)."""
    reference = x @ weight.t()
    scaled = x / scale
    if quantize_input is not None:
        scaled = quantize_input(scaled)
    return float((reference - scaled @ quantize(weight * scale).t()).pow(2).mean())


def awq_search(
    weight: torch.Tensor,
    stats: InputStats,
    quantize: Quantizer,
    quantize_input: Quantizer | None = None,
    grid: int = AWQ_GRID,
) -> tuple[torch.Tensor, float, list[float]]:
    """(s, the α chosen, the error of each α tried) of AWQ's grid search for a (out, in) float32 weight."""
    if stats.sample is None:
        raise ValueError("AWQ's search needs a sample of the layer's inputs")
    weight = weight.detach().float()
    x = stats.sample.to(weight.device)
    errors, best = [], (torch.ones_like(stats.mean), 0.0)
    for step in range(grid):
        alpha = step / grid
        scale = awq_scales(stats.mean.to(weight.device), alpha)
        errors.append(smoothed_error(weight, x, scale, quantize, quantize_input))
        if errors[-1] < min(errors[:-1], default=float("inf")):
            best = (scale, alpha)
    return best[0], best[1], errors


def scaled_hessian(hessian: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The Hessian 2/n Σ (x/s)(x/s)ᵀ of the smoothed inputs, from H = 2/n Σ x xᵀ: diag(1/s) H diag(1/s)."""
    inverse = 1.0 / scale.to(hessian.dtype)
    return hessian * inverse.view(-1, 1) * inverse.view(1, -1)

"""GPTQ: post-training weight quantisation with second-order error compensation (Frantar et al., 2022).

The algorithm of IST-DASLab/gptq `gptq.py` (`GPTQ.add_batch` and `GPTQ.fasterquant`, last changed in commit
9f2abd3 "Added static group option"; read at 2d65066): columns are quantised one at a time, and each column's
rounding error, scaled by the Cholesky factor of the inverse Hessian, is pushed onto the columns not yet
quantised; updates are applied lazily, `block_size` columns at a time. `techniques.quantization` wires it into
the quantization technique (`algorithm: "gptq"`); this module is the arithmetic and the Hessians.

Decisions:
- The grid is the project's symmetric one (`techniques.packed.layers`: scale = max|w| / (2^(b-1)-1), codes clamped to
  +-(2^(b-1)-1)), not the reference's `Quantizer(sym=True)` (scale 2·max|w| / (2^b-1) around zero point
  2^(b-1)): GPTQ does not depend on the grid, and the packed format and ONNX Runtime's MatMulNBits (zero point 8)
  take the project's. The result is codes and scales, so fake-quant and `finalize` reproduce it exactly.
- Hessian H = 2/n Σ x xᵀ over the n input rows (tokens) the layer sees over the calibration batches. The
  reference keeps a running mean weighted by each batch's first dimension (sequences); the overall scale of H
  cancels out of GPTQ, so the two differ only in how batches of different row counts are weighted.
- As the reference: dead inputs (H_ii = 0) get H_ii = 1 and zero weights; the damping is `damp` · mean(diag H)
  (reference `percdamp` .01); per-channel scales are taken from the whole weight before the dead columns are
  zeroed. Where the Cholesky factorisation fails, the damping is raised tenfold (up to 1) and the caller is
  told the damping used (GPTQModel retries with more damping too; llm-compressor falls back to RTN).
- Groups without act-order: a group's scale is computed when the sweep reaches its first column, from the
  weight as the lazy block updates left it (the reference's `find_params(W[:, i:i+groupsize])`; a group starting
  inside a block does not see that block's own pending updates yet — kept, so results equal the reference's).
- act-order ("desc_act") processes columns by descending diag(H) with *static groups* (the reference's
  `static_groups=True`, llm-compressor's `actorder="weight"`): the scales of the original, contiguous groups are
  computed before any update, and each column is quantised with its own group's scale. Groups stay contiguous
  in the weight's own column order, so the packed format and MatMulNBits blocks stay valid without the `g_idx`
  that GPTQModel's non-static act-order groups need.
- Pruned weights stay pruned: with a keep-mask, error updates skip pruned positions (llm-compressor's
  `preserve_zeros`), so they remain exactly zero and quantise to code 0.
- Conv2d inputs are unfolded to (rows, in·kh·kw) as the reference's `nn.Unfold` (after the layer's own padding,
  so reflect/replicate padding and "same" are seen as the convolution sees them); grouped convolutions, whose
  output groups see different inputs, are not handled here (the caller keeps them round-to-nearest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from techniques._base import base_type
from techniques.packed.bits import code_range
from techniques.packed.layers import symmetric_scale

DAMP = 0.01  # the reference's percdamp
BLOCK_SIZE = 128  # the reference's blocksize


class GPTQError(ValueError):
    """GPTQ cannot run on a layer (its damped Hessian is not positive definite even at damp 1)."""


def unsupported(module: nn.Module) -> str | None:
    """Why GPTQ cannot compensate this Linear/Conv2d's errors (None when it can)."""
    if base_type(module) is nn.Conv2d and module.groups != 1:
        return f"a grouped convolution (groups={module.groups}) sees different inputs per output group"
    return None


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (rows, row length) float32: one row per output position of a weight row."""
    if not isinstance(module, nn.Conv2d):
        return x.reshape(-1, x.shape[-1]).float()
    x = x if x.dim() == 4 else x.unsqueeze(0)
    if any(module._reversed_padding_repeated_twice):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).float()


class _Accumulator:
    """Σ x xᵀ and the row count over the inputs a layer sees."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.total: torch.Tensor | None = None
        self.rows = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        rows = input_rows(module, args[0].detach())
        product = rows.t() @ rows
        self.total = product if self.total is None else self.total + product
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor | None:
        return None if self.total is None or not self.rows else self.total * (2.0 / self.rows)


@contextmanager
def hessian_hooks(layers: Mapping[str, nn.Module]) -> Iterator[Callable[[], dict[str, torch.Tensor | None]]]:
    """While open, record each layer's inputs; yields a function returning name -> H = 2/n Σ x xᵀ (None for a
    layer that saw no input: one the model's forward never runs)."""
    accumulators = {name: _Accumulator(module) for name, module in layers.items()}
    handles = [a.module.register_forward_pre_hook(a.hook) for a in accumulators.values()]
    try:
        yield lambda: {name: a.hessian() for name, a in accumulators.items()}
    finally:
        for handle in handles:
            handle.remove()


def inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(upper Cholesky factor of (H + λI)^-1 with λ = damp · mean(diag H), the damp used): the reference's
    cholesky → cholesky_inverse → cholesky(upper); the damp is raised tenfold (up to 1) while that fails."""
    mean = torch.mean(torch.diag(hessian))
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    while True:
        damped = hessian.clone()
        damped[diag, diag] += damp * mean
        lower, info = torch.linalg.cholesky_ex(damped)
        if not info:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not info:
                return upper, damp
        if damp >= 1.0:
            raise GPTQError("the damped Hessian is not positive definite even with damp 1")
        damp = min(1.0, damp * 10)


def _dead_columns(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """In place, as the reference: inputs never seen (H_ii = 0) get H_ii = 1 and zero weights."""
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0


class _Scales:
    """Which scale each column is quantised with, in processing order; `chosen` ends up (rows, groups)."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None, perm: torch.Tensor | None) -> None:
        rows, columns = weight.shape
        self.bits, self.group = bits, group_size or columns
        self.static = group_size is None or perm is not None  # all scales known before the sweep
        original = torch.arange(columns) if perm is None else perm.cpu()
        self.group_of = (original // self.group).tolist()  # processing index -> group (of the original order)
        grouped = weight.reshape(rows, -1, self.group)
        self.chosen = symmetric_scale(grouped, bits).squeeze(2) if self.static else weight.new_ones(rows, 0)
        self.dynamic: list[torch.Tensor] = []

    def column(self, index: int, weight: torch.Tensor) -> torch.Tensor:
        """The (rows,) scale of the column processed `index`-th; `weight` is the sweep's lazily updated weight."""
        if self.static:
            return self.chosen[:, self.group_of[index]]
        if index % self.group == 0:
            self.dynamic.append(symmetric_scale(weight[:, index : index + self.group], self.bits)[:, 0])
        return self.dynamic[-1]

    def result(self) -> torch.Tensor:
        return self.chosen if self.static else torch.stack(self.dynamic, dim=1)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the per-column vector operations on one CPU thread: split across threads they spend longer waiting
    for each other than computing (the vectors are a few hundred elements)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sweep_block(
    block: torch.Tensor,
    hinv1: torch.Tensor,
    start: int,
    weight: torch.Tensor,
    scales: _Scales,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the columns of one block (`block`, updated in place; `start` its first column) one at a time,
    pushing each column's error onto the block's later columns; returns (codes, scaled errors)."""
    qmax = code_range(scales.bits)
    codes, errors = torch.zeros_like(block), torch.zeros_like(block)
    for i in range(block.shape[1]):
        w, d = block[:, i], hinv1[i, i]
        scale = scales.column(start + i, weight)
        codes[:, i] = torch.round(w / scale).clamp(-qmax, qmax)
        errors[:, i] = (w - codes[:, i] * scale) / d
        update = errors[:, i].unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
        block[:, i:] -= update if keep is None else update * keep[:, start + i : start + block.shape[1]]
    return codes, errors


def _sweep(
    weight: torch.Tensor, hinv: torch.Tensor, scales: _Scales, block_size: int, keep: torch.Tensor | None
) -> torch.Tensor:
    """The reference's block loop on `weight` (columns in processing order, updated in place); returns codes.
    Within a block columns go one by one (on one CPU thread); the lazy update of later columns is one GEMM."""
    columns = weight.shape[1]
    codes = torch.zeros_like(weight)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        with _one_cpu_thread(weight.device):
            codes[:, i1:i2], errors = _sweep_block(
                weight[:, i1:i2].clone(), hinv[i1:i2, i1:i2], i1, weight, scales, keep
            )
        update = errors.matmul(hinv[i1:i2, i2:])
        weight[:, i2:] -= update if keep is None else update * keep[:, i2:]
    return codes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
    act_order: bool = False,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(codes (rows, columns) as float32, scales (rows, groups), damp used) of a (rows, columns) weight.

    `hessian` is (columns, columns), 2/n Σ x xᵀ of the layer's inputs; `keep` an optional bool mask of weights
    that are not pruned (pruned ones must already be zero). The weight is `codes * scales` group by group.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    per_channel = symmetric_scale(W, bits) if group_size is None else None  # before dead columns, as the reference
    _dead_columns(W, H)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    scales = _Scales(W, bits, group_size, perm)
    if per_channel is not None:
        scales.chosen = per_channel
    mask = None if keep is None else keep.to(W.dtype)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        mask = None if mask is None else mask[:, perm]
    hinv, used = inverse_factor(H, damp)
    codes = _sweep(W, hinv, scales, block_size, mask)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales.result(), used

"""Low-rank factorisation: truncated SVD for Linear, Tucker-2 or CP (TensorLy) for Conv2d.

A per-layer rank is an int (explicit rank), a float in (0, 1) (keep at most that fraction of the
layer's parameters, weights and bias together; the largest rank that fits) or ``"energy:<e>"``
(smallest rank keeping fraction ``e`` of the squared singular-value energy). Tucker-2 ranks
(r_in, r_out): an int r gives (min(r, in), min(r, out)); a fraction keeps the same proportion of both
channel modes; an energy takes each channel unfolding's own energy rank (CP takes the larger of the two).
Factored layers become plain ``nn.Sequential`` chains of ``nn.Linear``/``nn.Conv2d``, so a checkpoint
rebuilds them from their recorded configurations. A factorisation that would not shrink the layer, or a
grouped or parametrised layer, is skipped and noted, never applied.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn
from torch.nn.utils import parametrize, skip_init

from techniques._base import (
    Context,
    LayerMap,
    LayerSearch,
    SearchSettings,
    SpecError,
    Technique,
    TechniqueSpec,
    is_integer,
    register,
    resolve_layers,
    set_module,
)

NAME = "lowrank"
CONV_METHODS = ("tucker", "cp")
ENERGY_PREFIX = "energy:"
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
Factorable = nn.Linear | nn.Conv2d  # the layers LAYER_TYPES selects (layers_of matches their exact types)
MAX_RANK = 1_000_000  # above any layer's full rank: a larger explicit rank could only mean "keep everything"


def _energy_fraction(value: str) -> float | None:
    """The fraction in an ``"energy:<e>"`` string, or None when the string is malformed, not finite or out of
    (0, 1]."""
    if not value.startswith(ENERGY_PREFIX):
        return None
    try:
        fraction = float(value[len(ENERGY_PREFIX) :])
    except ValueError:
        return None
    return fraction if math.isfinite(fraction) and 0.0 < fraction <= 1.0 else None


def _check_rank(layer: str, value: Any) -> None:
    """Raise SpecError unless `value` is a valid rank setting (None leaves the layer alone)."""
    if value is None:
        return
    ok = (
        (is_integer(value) and 1 <= value <= MAX_RANK)
        or (isinstance(value, float) and 0.0 < value < 1.0)  # nan and inf fail the comparison
        or (isinstance(value, str) and _energy_fraction(value) is not None)
    )
    if not ok:
        raise SpecError(
            f"{NAME}: rank for layer {layer!r} must be an int in [1, {MAX_RANK}], a float in (0, 1) or "
            f"'energy:<fraction in (0, 1]>', got {value!r}"
        )


@dataclass(frozen=True)
class LowRankSpec(TechniqueSpec):
    """Per-layer ranks for factorising Linear and Conv2d layers; `conv_method` picks Tucker-2 or CP.

    Valid ranks: an int (not a bool, not a float such as 4.0) in [1, MAX_RANK] = [1, 1_000_000], a float
    fraction strictly inside (0, 1), an ``"energy:<e>"`` string with a finite e in (0, 1], or None to leave a
    layer alone; nan and inf are rejected everywhere. `conv_method` is one of tucker, cp.
    """

    technique: ClassVar[str] = NAME

    rank: LayerMap
    conv_method: str = "tucker"

    def validate(self) -> None:
        for layer, value in self.rank.entries:
            _check_rank(layer, value)
        if self.conv_method not in CONV_METHODS:
            raise SpecError(f"{NAME}: conv_method must be one of {', '.join(CONV_METHODS)}, got {self.conv_method!r}")


# --------------------------------------------------------------------------- rank selection


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose leading singular values keep `energy` of the total squared energy."""
    squared = singular_values.double() ** 2
    kept = torch.cumsum(squared, 0) / squared.sum().clamp_min(torch.finfo(torch.float64).tiny)
    rank = int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=kept.dtype)).item()) + 1
    return min(rank, len(singular_values))


@dataclass(frozen=True)
class _Family:
    """The ranks one layer can be factored with: candidates in increasing cost, and how to pick one."""

    candidates: Sequence[Any]
    cost: Callable[[Any], int]
    explicit: Callable[[int], Any]
    by_energy: Callable[[float], Any]


def _select(value: int | float | str, family: _Family, budget: int) -> Any | None:
    """Ranks for one rank setting; a fraction picks the largest candidate within its share of `budget`."""
    if isinstance(value, str):
        return family.by_energy(_energy_fraction(value) or 1.0)
    if isinstance(value, float):
        fitting = [c for c in family.candidates if family.cost(c) <= value * budget]
        return fitting[-1] if fitting else None
    return family.explicit(value)


def _singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.detach().double().cpu())


def _n_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters(recurse=False))


# --------------------------------------------------------------------------- factorisations


def _new(cls: type[nn.Module], weight: torch.Tensor, *args: Any, like: torch.Tensor, **kwargs: Any) -> nn.Module:
    """A layer holding `weight` (and `bias=` tensor or None), built without random init so the global RNG
    is left alone, on the dtype/device of `like`."""
    bias = kwargs.pop("bias", None)
    module = skip_init(cls, *args, bias=bias is not None, device=like.device, dtype=like.dtype, **kwargs)
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape))
        if bias is not None:
            module.bias.copy_(bias)
    return module


def factor_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Truncated SVD, W ≈ (U√S)(√S Vᵀ): Linear(in, r, bias=False) then Linear(r, out) with the bias."""
    w = layer.weight
    u, s, vh = torch.linalg.svd(w.detach().double().cpu(), full_matrices=False)
    rank = min(rank, len(s))
    root = s[:rank].sqrt()
    first = _new(nn.Linear, vh[:rank] * root[:, None], layer.in_features, rank, like=w)
    second = _new(nn.Linear, u[:, :rank] * root, rank, layer.out_features, bias=layer.bias, like=w)
    return nn.Sequential(first, second)


def _decompose(fn: Callable[..., Any], weight: torch.Tensor, **kwargs: Any) -> Any:
    """Run a TensorLy decomposition on a float64 numpy copy, with the numpy backend scoped to this call.

    BLAS gets as many threads as torch has (Ray sets it per trial): OpenBLAS's default of every core
    oversubscribes a machine whose cores the trials already share, which slows CP most.
    """
    import tensorly as tl
    from threadpoolctl import threadpool_limits

    with (
        tl.backend_context("numpy", local_threadsafe=True),
        threadpool_limits(torch.get_num_threads(), user_api="blas"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # SVD init of a rank above a mode's size
        return fn(weight.detach().double().cpu().numpy(), **kwargs)


def _conv(like: torch.Tensor, weight: torch.Tensor, c_in: int, c_out: int, kernel: Any, **kw: Any) -> nn.Module:
    """A Conv2d holding `weight` (bias-free unless `bias=` is given)."""
    return _new(nn.Conv2d, weight, c_in, c_out, kernel, like=like, **kw)


def _last_conv(layer: nn.Conv2d, weight: torch.Tensor, rank: int) -> nn.Module:
    """The closing 1×1 conv rank→out, which carries the original bias."""
    return _conv(layer.weight, weight, rank, layer.out_channels, 1, bias=layer.bias)


def factor_conv_tucker(layer: nn.Conv2d, ranks: tuple[int, int], seed: int = 0) -> nn.Sequential:
    """Tucker-2 on the channel modes: 1×1 in→r_in, k×k r_in→r_out (original geometry), 1×1 r_out→out."""
    from tensorly.decomposition import partial_tucker

    r_in, r_out = min(ranks[0], layer.in_channels), min(ranks[1], layer.out_channels)
    (core, (u_out, u_in)), _ = _decompose(
        partial_tucker, layer.weight, rank=[r_out, r_in], modes=[0, 1], init="svd", random_state=seed
    )
    core, u_out, u_in = (torch.from_numpy(a) for a in (core, u_out, u_in))
    w = layer.weight
    geometry = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    return nn.Sequential(
        _conv(w, u_in.T, layer.in_channels, r_in, 1),
        _conv(w, core, r_in, r_out, layer.kernel_size, padding_mode=layer.padding_mode, **geometry),
        _last_conv(layer, u_out, r_out),
    )


def _depthwise(layer: nn.Conv2d, factor: torch.Tensor, axis: int) -> nn.Module:
    """Depthwise k×1 (axis 0) or 1×k (axis 1) conv of a CP factor, with that axis' stride/padding/dilation."""
    rank = factor.shape[1]

    def along(values: tuple[int, ...], other: int) -> tuple[int, int]:
        return (values[0], other) if axis == 0 else (other, values[1])

    padding = layer.padding if isinstance(layer.padding, str) else along(layer.padding, 0)
    return _conv(
        layer.weight,
        factor.T,
        rank,
        rank,
        along(layer.kernel_size, 1),
        groups=rank,
        stride=along(layer.stride, 1),
        padding=padding,
        dilation=along(layer.dilation, 1),
        padding_mode=layer.padding_mode,
    )


def factor_conv_cp(layer: nn.Conv2d, rank: int, seed: int = 0) -> nn.Sequential:
    """CP (Lebedev et al. 2015): 1×1 in→r, depthwise k×1, depthwise 1×k, 1×1 r→out with the bias."""
    from tensorly.decomposition import parafac

    weights, factors = _decompose(parafac, layer.weight, rank=rank, init="svd", random_state=seed, n_iter_max=200)
    a_out, a_in, a_h, a_w = (torch.from_numpy(a) for a in factors)
    return nn.Sequential(
        _conv(layer.weight, a_in.T, layer.in_channels, rank, 1),
        _depthwise(layer, a_h, 0),
        _depthwise(layer, a_w, 1),
        _last_conv(layer, a_out * torch.from_numpy(weights), rank),
    )


# --------------------------------------------------------------------------- planning


def _tucker_pairs(c_in: int, c_out: int) -> list[tuple[int, int]]:
    """(r_in, r_out) keeping the same proportion of both channel modes, in increasing size."""
    m = max(c_in, c_out)
    pairs = [(max(1, round(k * c_in / m)), max(1, round(k * c_out / m))) for k in range(1, m + 1)]
    return sorted(set(pairs))


def _family(layer: Factorable, method: str) -> _Family:
    """The rank family of a Linear (SVD) or Conv2d (Tucker-2 or CP) layer; costs count weights and bias."""
    bias = _n_params(layer) - layer.weight.numel()
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        n_in, n_out = layer.in_features, layer.out_features
        full = min(n_in, n_out)
        return _Family(
            range(1, full + 1),
            lambda r: r * (n_in + n_out) + bias,
            lambda r: min(r, full),
            lambda e: energy_rank(_singular_values(w), e),
        )
    c_in, c_out, (kh, kw) = layer.in_channels, layer.out_channels, layer.kernel_size

    def unfolding_ranks(e: float) -> tuple[int, int]:
        r_in = energy_rank(_singular_values(w.transpose(0, 1).reshape(c_in, -1)), e)
        return r_in, energy_rank(_singular_values(w.reshape(c_out, -1)), e)

    if method == "tucker":
        return _Family(
            _tucker_pairs(c_in, c_out),
            lambda r: c_in * r[0] + r[0] * r[1] * kh * kw + r[1] * c_out + bias,
            lambda r: (min(r, c_in), min(r, c_out)),
            unfolding_ranks,
        )
    per_rank = c_in + kh + kw + c_out
    return _Family(
        range(1, math.ceil(_n_params(layer) / per_rank) + 2),
        lambda r: r * per_rank + bias,
        lambda r: r,
        lambda e: max(unfolding_ranks(e)),
    )


def _factor_layer(name: str, layer: Factorable, value: Any, method: str, ctx: Context) -> nn.Module | None:
    """The factored replacement of one layer, or None (with a note) when it is skipped."""
    note = functools.partial(ctx.note, NAME, name, rank=value)
    before = _n_params(layer)
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        note(f"skipped: grouped convolution (groups={layer.groups}) is not factored")
        return None
    if parametrize.is_parametrized(layer):
        note("skipped: the layer carries parametrisations (masks/fake-quant); low-rank must come first")
        return None
    family = _family(layer, method)
    ranks = _select(value, family, before)
    if ranks is None:
        note(f"skipped: no rank keeps at most {value} of {before} parameters")
        return None
    after = family.cost(ranks)
    if after >= before:
        note(f"skipped: rank {ranks} would not reduce parameters ({after} >= {before})", ranks=ranks)
        return None
    new: nn.Sequential
    if isinstance(layer, nn.Linear):
        kind, new = "svd", factor_linear(layer, ranks)
    elif method == "tucker":
        kind, new = method, factor_conv_tucker(layer, ranks, seed=ctx.seed)
    else:
        kind, new = method, factor_conv_cp(layer, ranks, seed=ctx.seed)
    note(
        f"factored by {kind} with rank {ranks}: {before} -> {after} parameters",
        method=kind,
        ranks=ranks,
        params_before=before,
        params_after=after,
    )
    return new


def apply_lowrank(model: nn.Module, spec: LowRankSpec, ctx: Context) -> nn.Module:
    """Replace each addressed Linear/Conv2d layer by its factorisation (in place), noting every decision."""
    for name, layer, value in resolve_layers(model, spec.rank, LAYER_TYPES, NAME):
        new = _factor_layer(name, cast(Factorable, layer), value, spec.conv_method, ctx)
        if new is not None:
            set_module(model, name, new)
    return model


MIN_SEARCHED_WIDTH = 8  # factorising narrower layers cannot save enough to matter


def worth_factoring(layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """The layers a search factorises: plain Linear, and ungrouped Conv2d, at least 8 features wide."""
    return [
        name
        for name, m in layers
        if (isinstance(m, nn.Linear) and min(m.in_features, m.out_features) >= MIN_SEARCHED_WIDTH)
        or (isinstance(m, nn.Conv2d) and m.groups == 1 and min(m.in_channels, m.out_channels) >= MIN_SEARCHED_WIDTH)
    ]


register(
    Technique(
        name=NAME,
        spec_type=LowRankSpec,
        apply=apply_lowrank,
        layer_types=LAYER_TYPES,
        stage=10,
        search=SearchSettings(
            per_layer=LayerSearch(
                setting="rank",
                choices=("none", 0.5, 0.35, 0.25),  # fraction of a layer's parameters kept
                off="none",
                title="low-rank rank",
                eligible=worth_factoring,
            )
        ),
        structural=True,
    )
)

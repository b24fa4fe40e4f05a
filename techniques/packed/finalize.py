"""Finalize: bake masks and fake-quant into packed layers, leaving only plain or packed modules.

Decisions:
- A Linear/Conv2d carrying a WeightFakeQuant (it must be the last parametrisation on `weight`) becomes a
  PackedLinear/PackedConv2d with its codes, packed with the fake-quant's frozen scales when it has them (GPTQ's),
  else with scales recomputed from the weight, exactly as the fake-quant computes them. One carrying only
  WeightMask(s) becomes a float32 packed layer with sparse storage when the 1-bit mask saves bytes, else a
  plain layer with the mask baked in.
  Layers pruned with torch.nn.utils.prune (a `weight_mask` buffer and hook) are treated like WeightMask.
- Any other parametrisation is baked in (`leave_parametrized=True`) and the layer stays plain.
- An Embedding carrying a WeightFakeQuant becomes a PackedEmbedding (rows packed one by one, per-row
  scales); masks on an embedding are baked in before quantisation (a pruned row quantises to zero codes),
  and one carrying no fake-quant stays a plain Embedding with its parametrisations baked in.
- Activation fake-quant hooks and `input_quant` submodules are removed; their static scale moves into the
  packed layer, so a reloaded model behaves identically. A dynamic (per-row) one leaves no scale, only
  `act_dynamic` on the PackedLinear, which then quantises each input row at run time as fine-tuning did.
- A smoothed Linear (techniques.smoothing) loses its smoothing hook and `input_smoothing` submodule; its 1/s
  scales become the PackedLinear's `input_scale` (its weight, W·diag(s), is packed as any other).
- Which kernel a layer runs is one name (INT_KERNEL for both static and dynamic activations: the same
  `torch._int_mm` GEMM); a layer's `kernel_reason` says why one falls back, its `act_dynamic` how its
  activations are scaled.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from techniques._base import WeightMask, base_type, bias_of, parametrizations_of, set_module, weight_of
from techniques.fake_quant import ActivationFakeQuant, DynamicActivationFakeQuant, WeightFakeQuant, quantize_input_hook
from techniques.packed.embedding import PackedEmbedding
from techniques.packed.layers import INT_KERNEL, PackedConv2d, PackedLayer, PackedLinear
from techniques.quantization import LAYER_TYPES, is_embedding
from techniques.smoothing import InputSmoothing, smooth_input_hook

PLAIN_KERNEL = "fp32"
_Chain = tuple[torch.Tensor, torch.Tensor | None, WeightFakeQuant | None]


def _remove_input_quant(module: nn.Module) -> tuple[torch.Tensor | None, bool]:
    """Remove the activation fake-quant hook and submodule; return (its static scale or None, whether it
    quantised dynamically per row)."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is quantize_input_hook:
            del module._forward_pre_hooks[key]
    observer = module._modules.pop("input_quant", None)
    if isinstance(observer, DynamicActivationFakeQuant):
        return None, True
    return (None if observer is None else cast(ActivationFakeQuant, observer).scale.detach().clone()), False


def _remove_smoothing(module: nn.Module) -> torch.Tensor | None:
    """Remove the smoothing hook and submodule (techniques.smoothing); return its 1/s scales or None."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is smooth_input_hook:
            del module._forward_pre_hooks[key]
    smoothing = module._modules.pop("input_smoothing", None)
    return None if smoothing is None else cast(InputSmoothing, smoothing).scale.detach().clone()


def _weight_chain(module: nn.Module, name: str) -> _Chain:
    """(weight before quantisation, combined keep-mask or None, the fake-quant or None) of a layer."""
    if prune.is_pruned(module) and hasattr(module, "weight_mask"):
        pruned = cast(torch.Tensor, module.weight_mask).detach().to(torch.bool)
        prune.remove(module, "weight")
        return weight_of(module).detach(), pruned, None
    if not parametrize.is_parametrized(module, "weight"):
        return weight_of(module).detach(), None, None
    chain = parametrizations_of(module, "weight")
    weight = chain.original.detach()
    mask: torch.Tensor | None = None
    quant: WeightFakeQuant | None = None
    for index, step in enumerate(chain):
        if isinstance(step, WeightFakeQuant):
            if index != len(chain) - 1:
                raise ValueError(f"finalize: quantisation must be the last parametrisation on {name!r}")
            quant = step
            break
        if isinstance(step, WeightMask):
            keep = step.mask.expand_as(weight)
            mask = keep if mask is None else mask & keep
        with torch.no_grad():
            weight = step(weight)
    return weight, mask, quant


def _bake_embedding(module: nn.Embedding, name: str) -> nn.Module:
    """The PackedEmbedding replacing a quantised Embedding (the embedding itself, baked, when not quantised)."""
    weight, _, quant = _weight_chain(module, name)  # any mask is already applied to `weight`
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if quant is None:
        return module
    return PackedEmbedding.from_weight(
        weight, bits=quant.bits, group_size=quant.group_size, padding_idx=module.padding_idx
    )


def _bake(module: nn.Module, name: str) -> nn.Module:
    """The packed (or plain, baked) replacement for one Linear/Conv2d/Embedding."""
    if is_embedding(module):
        return _bake_embedding(cast(nn.Embedding, module), name)
    act_scale, act_dynamic = _remove_input_quant(module)
    smoothing = _remove_smoothing(module)
    weight, mask, quant = _weight_chain(module, name)
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    bits = quant.bits if quant is not None else 32
    activations = act_scale is not None or act_dynamic or smoothing is not None
    if quant is None and mask is None and not activations:
        return module
    cls: type[PackedLayer]
    if isinstance(module, nn.Linear):
        cls, layer = PackedLinear, {"in_features": module.in_features, "out_features": module.out_features}
        layer["smoothed"] = smoothing is not None
    else:  # embeddings were handled above: a Conv2d
        cls, layer = PackedConv2d, PackedConv2d.like(cast(nn.Conv2d, module))
    packed = cls.from_weight(
        weight,
        bits=bits,
        group_size=quant.group_size if quant is not None else None,
        mask=mask,
        bias=bias_of(module),
        act_scale=act_scale,
        act_dynamic=act_dynamic,
        kernel=quant.kernel if quant is not None else "auto",
        scale=quant.scale if quant is not None else None,
        **layer,
    )
    if smoothing is not None and isinstance(packed, PackedLinear):
        with torch.no_grad():
            packed.input_scale.copy_(smoothing)
    if quant is None and not packed.sparse and not activations:
        return module  # only pruned, and dense storage is smaller: the baked plain layer is the artifact
    return packed


def finalize(model: nn.Module) -> nn.Module:
    """Replace every pruned or quantised Linear/Conv2d/Embedding by its packed form (in place); return the model."""
    layers = [(name, module) for name, module in model.named_modules() if base_type(module) in LAYER_TYPES]
    for name, module in layers:
        new = _bake(module, name or "<model>")
        if new is module:
            continue
        if not name:
            return new
        set_module(model, name, new)
    return model


def kernel_report(model: nn.Module) -> dict[str, str]:
    """Layer name -> kernel its forward runs: INT_KERNEL (`torch._int_mm`, static or dynamic per-row
    activations), "dequantized-fp32" (decoded once; the layer's `kernel_reason` says why), GATHER_KERNEL (a
    packed embedding decoding the rows each lookup gathers), or "fp32" for plain Linear/Conv2d/Embedding."""
    report: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLayer | PackedEmbedding):
            report[name] = module.kernel
        elif base_type(module) in LAYER_TYPES:
            report[name] = PLAIN_KERNEL
    return report


def integer_layers(model: nn.Module) -> list[str]:
    """Names of the layers that run an integer GEMM."""
    return [name for name, kernel in kernel_report(model).items() if kernel == INT_KERNEL]


def finalized_copy(model: nn.Module) -> nn.Module:
    """Finalize a deep copy, leaving `model` (and its parametrisations) untouched.

    torch.nn.utils.parametrize gives each parametrised module a generated class holding the property
    for the parametrised tensor, and removing a parametrisation deletes that property from the class.
    A plain deepcopy shares the class, so each copied module gets a class of its own first.
    """
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return finalize(copied)

"""Quantization: per-layer weight bit-widths as fake-quant parametrisations, optional 8-bit activations.

Handles nn.Linear, nn.Conv2d and nn.Embedding (a token table is often half a language model's weights).

Decisions:
- `apply` registers a `WeightFakeQuant` parametrisation on each addressed layer's weight (after any
  WeightMask, so pruned weights stay zero). Its scales are recomputed from the current weight on every
  forward, so fine-tuning is quantisation-aware; gradients pass straight through (identity STE) to
  `parametrizations.weight.original`. bits=16 rounds weights through float16.
- Arithmetic (symmetric per-channel or per-group scales) lives in techniques.packed.layers and is shared with the
  packed deployment layers, so `finalize` reproduces the fake-quant weights bitwise.
- activation_bits=8 attaches an `ActivationFakeQuant` submodule (`input_quant`) and a forward pre-hook to
  each quantised Linear/Conv2d. Its static per-tensor scale is max|x| / 127 over the inputs seen while running the
  model (weights already fake-quantised, eval mode) over `ctx.calibration()` (or `ctx.example_inputs` when
  the context has no calibration data). Max rather than a percentile: deterministic, no sort over large
  tensors, and a calibration set is small enough that outliers are real inputs.
- A layer whose bits resolve to None (e.g. `{"fc2": None, "_default": 4}`) is left in float.
- `algorithm` picks how weight codes are chosen: "rtn" (default; round to nearest with scales recomputed on every
  forward, as above) or "gptq" (techniques.gptq: second-order error compensation from the Hessians of each layer's
  inputs, collected in one calibration pass over the model as the step receives it, every layer from the
  unquantised model's activations). GPTQ's codes become the weight (`parametrizations.weight.original` = codes *
  scales, which the pruning masks before it leave unchanged) and its scales are frozen in the WeightFakeQuant
  (a buffer), so the fake-quant model, `finalize`'s packed layers and their ONNX export compute the same codes.
  A later fine-tune moves the float weight with straight-through gradients and re-rounds it on those frozen
  scales. Embeddings, 16-bit layers, grouped convolutions and layers the forward never runs stay round-to-nearest,
  and the notes say so. Calibration comes from `ctx.calibration()` (example inputs, noted, when there is none).
- `smoothing` ("smoothquant" / "awq", techniques.smoothing) scales each quantised Linear's input channels before
  its weights are chosen: the statistics come from the same calibration pass as GPTQ's Hessians (the model as the
  step receives it), the weight becomes W·diag(s) and an inserted x·(1/s) runs before the activation quantiser, so
  fake-quant, `finalize` (a PackedLinear's `input_scale`) and exports compute the same numbers. With GPTQ the
  scaled weight is what GPTQ quantises. SmoothQuant is for layers that quantise their activations (w8a8,
  w8a8-dynamic, activation_bits 8); AWQ for any quantised Linear. Conv2d, embedding and 16-bit layers are not
  smoothed (noted once each). A model with no Linear layer at all refuses smoothing (SpecError); a policy that
  quantises none of its Linear layers is noted, so a search trial that leaves them all in float does not fail.
- Search: besides per-layer bits, `algorithm` (rtn/gptq), `group_size`, `smoothing` (none, smoothquant, awq) and
  `smoothing_alpha` (a float range, ALPHA_RANGE) are global settings. `group_size` is
  offered per channel only by default, because a global size must divide every quantised row and the
  declaration cannot see the model: `fitting_group_sizes(layers)` lists the sizes that fit a model, for a
  model-aware range or a search-space file (`"quantization": {"group_size": [null, 32, 128]}`).
- bits "w8a8" (W8A8) on a layer means 8-bit weights *and* 8-bit activations on that layer (calibrated as for
  activation_bits=8, whatever the spec's global `activation_bits`): the one setting that reaches the integer
  kernel, a Linear running `torch._int_mm` once finalized (techniques.packed.layers: static per-tensor activation
  scale, per-channel weight scales, `kernel="auto"`, no group size). A string beside the integer bit-widths
  rather than a second per-layer setting, because the search offers one setting per technique and "which
  kernel" is a choice about the same layer's numbers. Where the kernel cannot run (a Conv2d, a group size,
  `kernel="dequantize"`, CUDA shapes that are not multiples of 8) the layer runs decoded float32 and
  `techniques.packed.finalize.kernel_report` says so; an embedding takes ids, so "w8a8" there is 8-bit rows.
- bits "w8a8-dynamic" (W8A8_DYNAMIC) is W8A8 with *dynamic per-row* activations: at run time each row of a
  Linear's input (each token of a transformer) gets its own scale max|row| / 127, so an outlier token costs
  only its own row's precision (a static per-tensor scale is set by the largest activation anywhere, which
  on transformers flattens every ordinary token into a few codes) and nothing is calibrated. Fine-tuning sees
  the same quantisation (`DynamicActivationFakeQuant`, straight-through) as the finalized PackedLinear's
  `torch._int_mm` path computes on. The last dimension is a Linear's feature axis only: on a Conv2d
  "w8a8-dynamic" means 8-bit weights with float activations (no integer convolution exists here, and fake
  quantisation would cost accuracy for nothing), on an embedding 8-bit rows. A global `activation_bits: 8`
  does not override a layer's "w8a8-dynamic".
- The group size must divide every quantised layer's row length (in_features, in/groups*kh*kw, or an
  embedding's embedding_dim).
- An embedding's weight is (num_embeddings, embedding_dim), so "per output channel" is one scale per row:
  the same arithmetic as a Linear, no special case. Activation quantisation skips embeddings (their input is
  integer ids). An embedding with `max_norm` is refused (its forward renormalises the stored rows in place,
  which neither fake-quant nor a packed table can reproduce) and is not offered to the search;
  `padding_idx`, `sparse` and `scale_grad_by_freq` shape only gradients, which the straight-through
  estimator passes on unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from techniques import gptq, smoothing
from techniques._base import (
    Context,
    GlobalSearch,
    LayerMap,
    LayerSearch,
    SearchSettings,
    SpecError,
    Technique,
    TechniqueSpec,
    WeightMask,
    base_type,
    check_int,
    check_range,
    is_integer,
    is_number,
    layers_of,
    parametrizations_of,
    register,
    resolve_layers,
    weight_of,
)
from techniques.fake_quant import (
    ActivationFakeQuant,
    DynamicActivationFakeQuant,
    WeightFakeQuant,
    per_tensor_scale,
    quantize_input_hook,
)
from techniques.packed.layers import dequantize, fake_quantize_rows, quantize_activation, weight_codes
from techniques.smoothing import ALPHA, AWQ, SMOOTHQUANT
from techniques.tools.inputs import call_model, to_device

RTN, GPTQ = "rtn", "gptq"
ALGORITHMS = (RTN, GPTQ)  # how weight codes are chosen: round to nearest, or GPTQ (techniques.gptq)
GROUP_SIZES = (32, 64, 128)  # the group sizes worth searching, where they divide every quantised row

BITS = (2, 3, 4, 5, 6, 8, 16)
W8A8 = "w8a8"  # per-layer bits value: 8-bit weights and 8-bit activations, for the integer kernel
W8A8_DYNAMIC = "w8a8-dynamic"  # the same with activations quantised per row at run time (no calibration)
INT8_KERNEL_BITS = (W8A8, W8A8_DYNAMIC)  # the per-layer bits values that ask for the integer kernel
FLOAT_BITS = 32  # the search's value for "leave the layer in float32"
KERNELS = ("auto", "dequantize")
ACTIVATION_BITS = (8,)  # besides null (float activations)
MAX_GROUP_SIZE = 1 << 20  # elements per weight group; a row this long is per-channel quantisation anyway
ALPHA_RANGE = (0.3, 0.9)  # SmoothQuant migration strengths searched (the paper's models use 0.4-0.85)
MIN_FITTED_GROUP = 16  # `fit_groups` halves a group size down to this (the smallest MatMulNBits block)
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding)
Bits = TypeVar("Bits")  # a layer's bits setting (or its weight bit-width)
Found = TypeVar("Found")  # what calibration found for a layer (its input statistics, its Hessian)


@dataclass(frozen=True)
class QuantizationSpec(TechniqueSpec):
    """Weight bits per layer, optional weight group size, optional 8-bit activations, kernel preference, and the
    algorithm choosing the weight codes.

    Valid values: each layer's bits an int in BITS = {2, 3, 4, 5, 6, 8, 16}, the string W8A8 = "w8a8" (8-bit
    weights and calibrated 8-bit activations: the integer kernel), W8A8_DYNAMIC = "w8a8-dynamic" (the same with
    per-row activation scales computed at run time), or None (leave the layer in float);
    `group_size` null or an int in [1, MAX_GROUP_SIZE] = [1, 2**20] (it must also divide the row length of
    every quantised layer, checked against the model, unless `fit_groups` (a bool) is true: then a layer whose row
    it does not divide gets the largest of its half, quarter, … down to 16 that does, else per-channel scales);
    `activation_bits` null or 8; `kernel` one of KERNELS. Integers are ints: floats such as 8.0 and bools are
    rejected. `activation_bits` and `kernel` concern Linear/Conv2d layers only; embeddings take integer ids and
    have no GEMM.
    `algorithm` one of ALGORITHMS = {"rtn", "gptq"}; GPTQ's own settings (read only when algorithm is "gptq"):
    `damp` in (0, 1], the damping as a fraction of the Hessian's mean diagonal; `act_order` a bool (columns in
    descending Hessian diagonal, static groups); `block_size` an int in [1, MAX_GROUP_SIZE], the lazy-update block.
    `smoothing` null or one of smoothing.METHODS = {"smoothquant", "awq"} (techniques.smoothing: per-input-channel
    scales moved from each quantised Linear's inputs into its weight); `smoothing_alpha` in [0, 1], SmoothQuant's
    migration strength (AWQ searches its own exponent per layer and does not read it).
    `bits` defaults to no layer, so the global settings can be checked on their own (a search-space file).
    """

    technique = "quantization"

    bits: LayerMap = LayerMap()
    group_size: int | None = None
    activation_bits: int | None = None
    kernel: str = "auto"
    algorithm: str = RTN
    damp: float = gptq.DAMP
    act_order: bool = False
    block_size: int = gptq.BLOCK_SIZE
    fit_groups: bool = False
    smoothing: str | None = None
    smoothing_alpha: float = ALPHA

    def validate(self) -> None:
        for key, value in self.bits.entries:
            if value is not None and value not in INT8_KERNEL_BITS and not (is_integer(value) and value in BITS):
                choices = ", ".join(map(str, (*BITS, *INT8_KERNEL_BITS)))
                raise SpecError(f"quantization: bits for layer {key!r} must be in {{{choices}}}, got {value!r}")
        size = self.group_size
        if size is not None and not (is_integer(size) and 1 <= size <= MAX_GROUP_SIZE):
            raise SpecError(
                f"quantization: group_size must be an integer in [1, {MAX_GROUP_SIZE}] or null, got {size!r}"
            )
        act = self.activation_bits
        if act is not None and not (is_integer(act) and act in ACTIVATION_BITS):
            raise SpecError(f"quantization: activation_bits must be 8 or null, got {act!r}")
        if self.kernel not in KERNELS:
            raise SpecError(f"quantization: kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        self._validate_algorithm()

    def _validate_algorithm(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise SpecError(f"quantization: algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if not (is_number(self.damp) and 0 < self.damp <= 1):
            raise SpecError(f"quantization: damp must be a number in (0, 1], got {self.damp!r}")
        for name in ("act_order", "fit_groups"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"quantization: {name} must be true or false, got {getattr(self, name)!r}")
        check_int("quantization", "block_size", self.block_size, 1, MAX_GROUP_SIZE)
        if self.smoothing is not None and self.smoothing not in smoothing.METHODS:
            methods = ", ".join(smoothing.METHODS)
            raise SpecError(f"quantization: smoothing must be null or one of {methods}, got {self.smoothing!r}")
        check_range("quantization", "smoothing_alpha", self.smoothing_alpha, 0.0, 1.0)


def is_embedding(module: nn.Module) -> bool:
    """Whether a (possibly parametrised) layer is an nn.Embedding: its input is ids, its rows are its channels."""
    return base_type(module) is nn.Embedding


def fitting_group_sizes(layers: Sequence[tuple[str, nn.Module]]) -> tuple[int | None, ...]:
    """The group sizes worth searching for these layers: None (per channel), then each of GROUP_SIZES that divides
    the row length of every searchable layer (a model-aware range for `group_size`)."""
    names = set(searchable_layers(layers))
    rows = [weight_of(module)[0].numel() for name, module in layers if name in names]
    return (None, *(size for size in GROUP_SIZES if all(row % size == 0 for row in rows)))


def searchable_layers(layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """The layers the search offers bit-widths for: all but embeddings with `max_norm` (which are refused)."""
    return [name for name, module in layers if not (is_embedding(module) and module.max_norm is not None)]


def weight_bits(bits: int | str) -> int:
    """The weight bit-width a layer's `bits` value means (W8A8, W8A8_DYNAMIC: 8)."""
    return 8 if bits in INT8_KERNEL_BITS else int(bits)


def is_linear(module: nn.Module) -> bool:
    """Whether a (possibly parametrised) layer is an nn.Linear: its input's last dimension is its GEMM's K."""
    return base_type(module) is nn.Linear


def activation_mode(module: nn.Module, bits: int | str, spec: QuantizationSpec) -> str | None:
    """How a quantised layer's inputs are quantised: "dynamic" (per row at run time), "static" (calibrated
    per tensor) or None (float: embeddings, which take ids, and layers asking for no activation bits)."""
    if is_embedding(module):
        return None
    if bits == W8A8_DYNAMIC:
        return "dynamic" if is_linear(module) else None
    return "static" if spec.activation_bits is not None or bits == W8A8 else None


def fitted_group_size(row: int, group_size: int | None) -> int | None:
    """The largest of `group_size`, its half, its quarter, … (whole, at least MIN_FITTED_GROUP) that divides a row
    of `row` weights; None (one scale per output channel) when none does."""
    size = group_size
    while size is not None and row % size:
        size = size // 2 if size % 2 == 0 and size // 2 >= MIN_FITTED_GROUP else None
    return size


def layer_group_size(module: nn.Module, spec: QuantizationSpec) -> int | None:
    """The group size a quantised layer gets: the spec's, or with `fit_groups` the one fitted to its row."""
    if spec.group_size is None or not spec.fit_groups:
        return spec.group_size
    return fitted_group_size(weight_of(module)[0].numel(), spec.group_size)


def quantizable_layers(model: nn.Module, spec: QuantizationSpec) -> list[tuple[str, nn.Module, int | str]]:
    """(name, layer, bits) of each Linear/Conv2d/Embedding the spec quantises; SpecError for a bad address."""
    layers = resolve_layers(model, spec.bits, LAYER_TYPES, "quantization")
    for name, module, _ in layers:
        if is_embedding(module) and module.max_norm is not None:
            raise SpecError(
                f"quantization: embedding {name!r} has max_norm={module.max_norm}, which renormalises its stored "
                f"rows on every lookup and cannot be quantised; give it bits null"
            )
        row = weight_of(module)[0].numel()
        if spec.group_size is not None and row % spec.group_size and not spec.fit_groups:
            size, what = spec.group_size, "embedding_dim" if is_embedding(module) else "row length"
            raise SpecError(
                f"quantization: group_size {size} does not divide {what} {row} of layer {name!r} "
                "(fit_groups: true picks a smaller group, or per channel, for such layers)"
            )
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, WeightFakeQuant) for p in parametrizations_of(module, "weight")
        ):
            raise SpecError(f"quantization: layer {name!r} is already quantised")
    return layers


def run_calibration(model: nn.Module, ctx: Context, purpose: str) -> None:
    """Run the model in eval mode without gradients over the calibration batches (`ctx.example_inputs` when the
    context has none, which is noted as the source of `purpose`)."""
    if ctx.calibration is not None:
        batches = ctx.calibration()
    else:
        ctx.note("quantization", None, f"no calibration data; {purpose} from example inputs")
        batches = [ctx.example_inputs]
    device = next((p.device for p in model.parameters()), ctx.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(model, to_device(batch, device))
    finally:
        model.train(was_training)


def _calibrate(model: nn.Module, observers: list[ActivationFakeQuant], ctx: Context) -> None:
    """Run the model over the calibration batches to set every observer's static scale."""
    for observer in observers:
        observer.observing = True
    try:
        run_calibration(model, ctx, "activation scales")
    finally:
        for observer in observers:
            observer.freeze()


def _keep_mask(module: nn.Module) -> tuple[torch.Tensor | None, str | None]:
    """(the combined keep-mask of the layer's pruning masks or None, why GPTQ cannot rewrite its weight or None):
    GPTQ writes its result into the unparametrised weight, which only masks (kept zero) leave unchanged."""
    if hasattr(module, "weight_orig"):
        return None, "pruned with torch.nn.utils.prune (its weight is recomputed by a hook)"
    if not parametrize.is_parametrized(module, "weight"):
        return None, None
    keep: torch.Tensor | None = None
    for step in parametrizations_of(module, "weight"):
        if not isinstance(step, WeightMask):
            return None, f"its weight carries a {type(step).__name__} parametrisation, not only pruning masks"
        mask = step.mask.expand_as(weight_of(module))
        keep = mask if keep is None else keep & mask
    return keep, None


def _gptq_targets(layers: list[tuple[str, nn.Module, int | str]], ctx: Context) -> list[tuple[str, nn.Module, int]]:
    """(name, layer, weight bits) of the layers GPTQ quantises; the others are noted as rounded to nearest
    (embeddings and 16-bit layers once each, any other per layer)."""
    targets, tables, halves = [], [], []
    for name, module, bits in layers:
        if is_embedding(module):
            tables.append(name)
        elif weight_bits(bits) == 16:
            halves.append(name)
        elif reason := gptq.unsupported(module) or _keep_mask(module)[1]:
            ctx.note("quantization", name, f"round to nearest, not GPTQ: {reason}")
        else:
            targets.append((name, module, weight_bits(bits)))
    if tables:
        ctx.note("quantization", None, "GPTQ is for Linear/Conv2d weights: embeddings round to nearest", layers=tables)
    if halves:
        ctx.note("quantization", None, "16-bit weights round to float16, not GPTQ", layers=halves)
    return targets


def _smoothing_targets(
    model: nn.Module, layers: list[tuple[str, nn.Module, int | str]], spec: QuantizationSpec, ctx: Context
) -> list[tuple[str, nn.Module, int | str]]:
    """(name, layer, bits) of the layers the spec's smoothing scales: quantised Linear layers below 16 bits (with
    SmoothQuant, those quantising their activations); the others are noted, once per reason. SpecError when the
    model has no Linear layer at all."""
    method = spec.smoothing
    if not any(True for _ in layers_of(model, (nn.Linear,))):
        raise SpecError(
            f"quantization: smoothing ({method}) scales the inputs of Linear layers, and the model has none"
        )
    targets: list[tuple[str, nn.Module, int | str]] = []
    skipped: dict[str, list[str]] = {}
    for name, module, bits in layers:
        if is_embedding(module):
            continue
        if not is_linear(module):
            why = "smoothing is for Linear layers"
        elif weight_bits(bits) == 16:
            why = "16-bit weights are not smoothed"
        elif method == SMOOTHQUANT and activation_mode(module, bits, spec) is None:
            why = "SmoothQuant smooths for activation quantisation; weight-only layers are left as they are"
        elif reason := _keep_mask(module)[1]:
            ctx.note("quantization", name, f"not smoothed: {reason}")
            continue
        else:
            targets.append((name, module, bits))
            continue
        skipped.setdefault(why, []).append(name)
    for why, names in skipped.items():
        ctx.note("quantization", None, f"not smoothed: {why}", layers=names)
    if not targets:
        ctx.note("quantization", None, f"smoothing ({method}): no quantised Linear layer to smooth")
    return targets


def _stored_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor a layer stores (under its parametrisations, which are only masks here)."""
    if parametrize.is_parametrized(module, "weight"):
        return parametrizations_of(module, "weight").original
    return weight_of(module)


def _layer_quantizers(
    module: nn.Module, bits: int | str, spec: QuantizationSpec
) -> tuple[smoothing.Quantizer, smoothing.Quantizer | None]:
    """(the layer's round-to-nearest weight quantiser, its activation fake-quant or None) for AWQ's search; a static
    activation scale is taken from the rows quantised (the calibration sample)."""
    wbits, group = weight_bits(bits), layer_group_size(module, spec)

    def weights(w: torch.Tensor) -> torch.Tensor:
        return dequantize(*weight_codes(w, wbits, group), w.shape)

    def static(x: torch.Tensor) -> torch.Tensor:
        scale = per_tensor_scale(x.abs().amax())
        return quantize_activation(x, scale) * scale

    mode = activation_mode(module, bits, spec)
    return weights, {"dynamic": fake_quantize_rows, "static": static}.get(mode or "")


def _seen(
    targets: Sequence[tuple[str, nn.Module, Bits]], found: Mapping[str, Found | None], ctx: Context, skipped: str
) -> Iterator[tuple[str, nn.Module, Bits, Found]]:
    """(name, layer, bits, what calibration found) of the targets that ran during calibration; each other one is
    noted as `skipped`."""
    for name, module, bits in targets:
        seen = found[name]
        if seen is None:
            ctx.note("quantization", name, f"{skipped}: the layer never ran during calibration")
            continue
        yield name, module, bits, seen


def _smooth(
    targets: list[tuple[str, nn.Module, int | str]],
    found: dict[str, smoothing.InputStats | None],
    spec: QuantizationSpec,
    ctx: Context,
) -> dict[str, tuple[torch.Tensor, float]]:
    """Smooth each target from its input statistics (techniques.smoothing); name -> (s, α used)."""
    chosen = {}
    for name, module, bits, stats in _seen(targets, found, ctx, "not smoothed"):
        weight = weight_of(module).detach()
        if spec.smoothing == SMOOTHQUANT:
            scale, alpha = smoothing.smoothquant_scales(stats.amax, weight, spec.smoothing_alpha), spec.smoothing_alpha
        else:
            scale, alpha, _ = smoothing.awq_search(weight, stats, *_layer_quantizers(module, bits, spec))
            if alpha == 0:  # s = 1: nothing to insert
                ctx.note("quantization", name, "not smoothed: AWQ's search chose alpha 0 (round to nearest)")
                continue
        smoothing.install(module, _stored_weight(module), scale)
        chosen[name] = (scale, alpha)
    return chosen


def _calibrated(
    model: nn.Module, layers: list[tuple[str, nn.Module, int | str]], spec: QuantizationSpec, ctx: Context
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """One calibration pass of the model as this step receives it (before any fake-quant) for what the spec asks:
    the smoothing statistics (the layers are smoothed in place) and GPTQ's Hessians; returns (GPTQ's results,
    name -> α of each smoothed layer)."""
    targets = _gptq_targets(layers, ctx) if spec.algorithm == GPTQ else []
    smoothed = _smoothing_targets(model, layers, spec, ctx) if spec.smoothing else []
    rows = smoothing.SAMPLE_ROWS if spec.smoothing == AWQ else 0
    purpose = " and ".join(["GPTQ Hessians"] * bool(targets) + ["smoothing statistics"] * bool(smoothed))
    with (
        gptq.hessian_hooks({name: module for name, module, _ in targets}) as hessians,
        smoothing.statistics_hooks({name: module for name, module, _ in smoothed}, rows) as statistics,
    ):
        if purpose:
            run_calibration(model, ctx, purpose)
    scales = _smooth(smoothed, statistics(), spec, ctx)
    gptq_results = _gptq(targets, hessians(), {name: s for name, (s, _) in scales.items()}, spec, ctx)
    return gptq_results, {name: alpha for name, (_, alpha) in scales.items()}


def _gptq(
    targets: list[tuple[str, nn.Module, int]],
    found: dict[str, torch.Tensor | None],
    scales: dict[str, torch.Tensor],
    spec: QuantizationSpec,
    ctx: Context,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (GPTQ's quantised weight, its (out, groups) scales) for the layers GPTQ handles, from the Hessians
    of their inputs (of the smoothed inputs, diag(1/s) H diag(1/s), where a layer was smoothed by `scales`)."""
    result = {}
    for name, module, bits, hessian in _seen(targets, found, ctx, "round to nearest, not GPTQ"):
        if name in scales:
            hessian = smoothing.scaled_hessian(hessian, scales[name])
        weight = weight_of(module).detach()
        keep, _ = _keep_mask(module)
        rows = weight.reshape(weight.shape[0], -1)
        try:
            codes, scale, damp = gptq.gptq_quantize(
                rows, hessian, bits, layer_group_size(module, spec), damp=spec.damp, block_size=spec.block_size,
                act_order=spec.act_order, keep=None if keep is None else keep.reshape(rows.shape),
            )  # fmt: skip
        except gptq.GPTQError as exc:
            ctx.note("quantization", name, f"round to nearest, not GPTQ: {exc}")
            continue
        if damp != spec.damp:
            ctx.note("quantization", name, f"GPTQ needed damp {damp:g} (asked {spec.damp:g})", damp=damp)
        grouped = codes.reshape(rows.shape[0], scale.shape[1], -1)
        result[name] = (dequantize(grouped, scale.unsqueeze(2), weight.shape).to(weight.dtype), scale)
    return result


def _describe(bits: int | str, module: nn.Module) -> str:
    if bits not in INT8_KERNEL_BITS:
        return f"{bits}-bit weights"
    if is_embedding(module):
        return f"8-bit rows ({bits}: an embedding's inputs are ids, not activations)"
    if bits == W8A8:
        return "8-bit weights and activations (w8a8: the integer kernel where the layer allows it)"
    if is_linear(module):
        return "8-bit weights, activations 8-bit per row at run time (w8a8-dynamic: the integer kernel)"
    return "8-bit weights, float activations (w8a8-dynamic: per-row activations are for Linear layers only)"


def apply(model: nn.Module, spec: QuantizationSpec, ctx: Context) -> nn.Module:
    """Smooth the inputs of the addressed Linear layers (when asked), then register weight fake-quant (and calibrated
    activation fake-quant) on the addressed layers; with GPTQ, its weights and frozen scales."""
    layers = quantizable_layers(model, spec)
    chosen, alphas = _calibrated(model, layers, spec, ctx)
    for name, module, bits in layers:
        quantized, scale = chosen.get(name, (None, None))
        group = layer_group_size(module, spec)
        fake_quant = WeightFakeQuant(weight_bits(bits), group, spec.kernel, scale)
        parametrize.register_parametrization(module, "weight", fake_quant)
        how: dict[str, Any] = {}
        if quantized is not None:  # masks before the fake-quant keep it as it is: its pruned weights are zero
            with torch.no_grad():
                parametrizations_of(module, "weight").original.copy_(quantized)
            how = {"algorithm": GPTQ, "act_order": spec.act_order}
        described = _describe(bits, module) + (" (GPTQ)" if how else "")
        if name in alphas:
            described += f", inputs smoothed ({spec.smoothing}, alpha {alphas[name]:g})"
            how |= {"smoothing": spec.smoothing, "smoothing_alpha": alphas[name]}
        if group != spec.group_size:
            fitted = f"groups of {group}" if group else "one scale per output channel"
            described += f", {fitted}: group_size {spec.group_size} does not divide its rows"
        ctx.note("quantization", name, described, bits=bits, group_size=group, **how)
    _attach_activation_quant(model, layers, spec, ctx)
    return model


def _attach_activation_quant(
    model: nn.Module, layers: list[tuple[str, nn.Module, int | str]], spec: QuantizationSpec, ctx: Context
) -> None:
    """Attach each layer's activation fake-quant (after any smoothing hook) and calibrate the static ones."""
    observers: list[ActivationFakeQuant] = []
    for _, module, bits in layers:
        mode = activation_mode(module, bits, spec)
        if mode == "static":
            observers.append(ActivationFakeQuant().to(weight_of(module).device))
            module.input_quant = observers[-1]
        elif mode == "dynamic":
            module.input_quant = DynamicActivationFakeQuant()
        if mode is not None:
            module.register_forward_pre_hook(quantize_input_hook)
    if observers:  # only static scales are calibrated
        _calibrate(model, observers, ctx)


register(
    Technique(
        name="quantization",
        spec_type=QuantizationSpec,
        apply=apply,
        layer_types=LAYER_TYPES,
        stage=40,
        search=SearchSettings(
            per_layer=LayerSearch(
                setting="bits",
                # weight bit-width (w8a8: + static activations, w8a8-dynamic: + per-row ones); 32: float32
                choices=(2, 3, 4, 5, 6, 8, W8A8, W8A8_DYNAMIC, FLOAT_BITS),
                off=FLOAT_BITS,
                title="quantization bits",
                eligible=searchable_layers,
            ),
            globals=(
                GlobalSearch("algorithm", choices=ALGORITHMS, reference=RTN),
                # per channel unless the user (or a model-aware range, see `fitting_group_sizes`) widens it
                GlobalSearch("group_size", choices=(None,), reference=None),
                GlobalSearch("smoothing", choices=(None, *smoothing.METHODS), reference=None),
                GlobalSearch("smoothing_alpha", bounds=ALPHA_RANGE, reference=smoothing.ALPHA),
            ),
        ),
    )
)

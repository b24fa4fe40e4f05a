"""Knowledge distillation: the fine-tuning loop that trains a compressed student against its teacher.

Loss = alpha · output loss + (1 − alpha) · task loss, plus an optional feature term. The output loss
compares the student's output tensor with the teacher's (both reduced by the workload's `output_fn`): the
workload's own `distill_loss(student_out, teacher_out, batch)` when it gives one, else the spec's built-in
`loss` — `"kl"`, T² · KL(softmax(teacher/T) ‖ softmax(student/T)) over classes on dim 1 (the default, for
logits), `"cosine"`, 1 − cosine similarity along the last dim (embeddings), or `"mse"` (regression,
embeddings). The feature term is the mean squared error between the outputs of paired student and teacher
layers — same-named ones (`feature_layers`) and/or a student → teacher mapping (`feature_map`, so a shallower
student learns from chosen layers of a deeper teacher) — through a learned 1×1 conv / linear projection when
the widths differ (training-only, never part of the returned model). Masks and fake-quant registered with
`torch.nn.utils.parametrize` stay in place: training updates their `original` tensors through them.

Decisions: the workload's loss wins over the spec's `loss` because only the workload knows what its outputs
mean; the spec cannot override it, and a note records it. New settings come with defaults that reproduce the
old behaviour, so the spec stays at version 1 and documents written before them load unchanged (a version
bump is for a document whose meaning changes, and `spec_from_json` would reject every older one).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from techniques._base import (
    Context,
    GlobalSearch,
    SearchSettings,
    SpecError,
    Technique,
    TechniqueSpec,
    check_int,
    check_range,
    is_number,
    register,
)
from techniques.tools.inputs import Inputs, main_output, to_device

NAME = "distillation"
LOSSES = ("kl", "cosine", "mse")  # the built-in output losses, by `DistillationSpec.loss`
SCHEDULES = ("constant", "cosine")  # the learning rate over the budget, by `DistillationSpec.schedule`
# Bounds of the settings (inclusive unless noted), chosen so that every valid spec trains with finite numbers.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 100.0  # logits / T and T² stay well inside float32
MAX_LR = 1.0  # lr in (0, MAX_LR]
MAX_WEIGHT_DECAY = 1.0  # AdamW shrinks weights by lr · weight_decay per step: at most all of them
MAX_EPOCHS = 1000
MAX_STEPS = 1_000_000
MAX_FEATURE_WEIGHT = 1e4  # the feature term times this stays finite in float32


@dataclass(frozen=True)
class DistillationSpec(TechniqueSpec):
    """Temperature, loss, loss mix, budget (epochs and/or optimiser steps), feature pairs and optimiser.

    Valid values (numbers finite, never bools; ints accepted where a float is meant, never the reverse):
    `temperature` in [MIN_TEMPERATURE, MAX_TEMPERATURE] = [0.05, 100] (used by `loss="kl"` only); `alpha` in
    [0, 1]; `loss` one of LOSSES = "kl" | "cosine" | "mse" (the workload's `distill_loss` replaces it when
    given); `epochs` an integer in [0, MAX_EPOCHS] = [0, 1000]; `steps` null or an integer in
    [0, MAX_STEPS] = [0, 1_000_000]; `lr` in (0, MAX_LR] = (0, 1]; `schedule` one of SCHEDULES = "constant" |
    "cosine" (`lr` decayed to 0 along a half cosine over the budget); `weight_decay` in [0, MAX_WEIGHT_DECAY] =
    [0, 1]; `feature_layers` a list of distinct non-empty layer names (each in the student and the teacher);
    `feature_map` an object {student layer: teacher layer} of non-empty names, whose student layers are not
    also in `feature_layers`; `feature_weight` in [0, MAX_FEATURE_WEIGHT] = [0, 1e4], above 0 only with
    feature layers (from either field).

    Budget: the fine-tune stops at whichever of `epochs` passes over the training data and `steps` optimiser
    steps comes first. `steps` 0 or null means no step budget (epochs only); `epochs=0` with `steps=N` means
    "run N steps, over as many epochs as that takes"; both empty is an error.
    """

    technique: ClassVar[str] = NAME

    temperature: float = 4.0
    alpha: float = 0.7
    loss: str = "kl"
    epochs: int = 2
    steps: int | None = None
    lr: float = 1e-3
    schedule: str = "constant"
    weight_decay: float = 0.0
    feature_layers: tuple[str, ...] = ()
    feature_map: tuple[tuple[str, str], ...] = ()  # JSON: {student layer: teacher layer}
    feature_weight: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.feature_layers, list):
            object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
        if isinstance(self.feature_map, Mapping):
            object.__setattr__(self, "feature_map", tuple(self.feature_map.items()))
        super().__post_init__()

    def validate(self) -> None:
        check_range(NAME, "temperature", self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
        if not is_number(self.lr) or not 0 < self.lr <= MAX_LR:
            raise SpecError(f"{NAME}: lr must be in (0, {MAX_LR}], got {self.lr!r}")
        check_range(NAME, "alpha", self.alpha, 0.0, 1.0)
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise SpecError(f"{NAME}: loss must be one of {', '.join(map(repr, LOSSES))}, got {self.loss!r}")
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise SpecError(f"{NAME}: schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {self.schedule!r}")
        check_range(NAME, "weight_decay", self.weight_decay, 0.0, MAX_WEIGHT_DECAY)
        check_range(NAME, "feature_weight", self.feature_weight, 0.0, MAX_FEATURE_WEIGHT)
        check_int(NAME, "epochs", self.epochs, 0, MAX_EPOCHS)
        if self.steps is not None:
            check_int(NAME, "steps", self.steps, 0, MAX_STEPS)
        if self.epochs == 0 and not self.steps:
            raise SpecError(f"{NAME}: the budget is empty; give epochs > 0 and/or steps > 0")
        self._validate_features()

    def _validate_features(self) -> None:
        if not isinstance(self.feature_layers, tuple) or not all(
            isinstance(name, str) and name for name in self.feature_layers
        ):
            raise SpecError(f"{NAME}: feature_layers must be a list of layer names, got {self.feature_layers!r}")
        if not isinstance(self.feature_map, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(n, str) and n for n in pair)
            for pair in self.feature_map
        ):
            raise SpecError(
                f"{NAME}: feature_map must be an object of student layer → teacher layer names, "
                f"got {self.feature_map!r}"
            )
        mapped = [student for student, _ in self.feature_map]
        for field, names in (("feature_layers", list(self.feature_layers)), ("feature_map", mapped)):
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise SpecError(f"{NAME}: {field} names {', '.join(map(repr, repeated))} more than once")
        both = sorted(set(self.feature_layers) & set(mapped))
        if both:
            raise SpecError(f"{NAME}: {', '.join(map(repr, both))} in both feature_layers and feature_map")
        if self.feature_weight > 0 and not self.feature_pairs:
            raise SpecError(f"{NAME}: feature_weight {self.feature_weight} needs feature_layers or feature_map")

    @property
    def feature_pairs(self) -> tuple[tuple[str, str], ...]:
        """(student layer, teacher layer) pairs: `feature_layers` paired by name, then `feature_map`."""
        return tuple((name, name) for name in self.feature_layers) + tuple(self.feature_map)

    def to_json(self) -> dict[str, Any]:
        doc = super().to_json()
        doc["_data"]["feature_map"] = dict(self.feature_map)
        return doc


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of temperature-softened class distributions (classes on dim 1)."""
    if student.dim() < 2:
        raise ValueError(
            f"{NAME}: loss 'kl' needs class logits on dim 1, but the outputs are {tuple(student.shape)}; "
            "use loss 'mse' for regression"
        )
    classes = student.shape[1]
    s = student.movedim(1, -1).reshape(-1, classes) / temperature
    t = teacher.movedim(1, -1).reshape(-1, classes) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def output_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The built-in output loss `kind` (one of LOSSES) between student and teacher outputs of one shape."""
    if kind == "kl":
        return kd_loss(student, teacher, temperature)
    if kind == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise SpecError(f"{NAME}: unknown loss {kind!r}; known: {', '.join(LOSSES)}")


def feature_modules(model: nn.Module, names: tuple[str, ...], role: str = "student") -> list[nn.Module]:
    """The modules `names` address in `model`; SpecError naming the first missing one."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise SpecError(f"{NAME}: feature layer {missing[0]!r} is not a module of the {role}")
    return [modules[name] for name in names]


def feature_tensor(output: Any, name: str, role: str) -> torch.Tensor:
    """The tensor a feature layer outputs: itself, or the first tensor of a tuple / mapping (a Hugging Face
    layer returns `(hidden_states, ...)` in some versions and the bare tensor in others)."""
    try:
        return main_output(output)
    except TypeError:
        raise SpecError(f"{NAME}: feature layer {name!r} of the {role} does not output a tensor") from None


class _Features:
    """Forward hooks capturing the outputs of paired (student layer, teacher layer) modules."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs
        self.outputs: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self.handles = []
        for role, model, names in (
            ("student", student, tuple(s for s, _ in pairs)),
            ("teacher", teacher, tuple(dict.fromkeys(t for _, t in pairs))),
        ):
            for name, module in zip(names, feature_modules(model, names, role), strict=True):
                self.handles.append(module.register_forward_hook(self._hook(role, name)))

    def _hook(self, role: str, name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            self.outputs[role][name] = feature_tensor(output, name, role)

        return hook

    def captured(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(student layer, student output, teacher output) of the last forward passes, pair by pair."""
        for student, teacher in self.pairs:
            for role, name in (("student", student), ("teacher", teacher)):
                if name not in self.outputs[role]:
                    raise ValueError(f"{NAME}: feature layer {name!r} of the {role} did not run in its forward pass")
            yield student, self.outputs["student"][student], self.outputs["teacher"][teacher]

    def clear(self) -> None:
        for outputs in self.outputs.values():
            outputs.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _projection(name: str, student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """Identity when shapes match, else a bias-free map from student to teacher channels: a 1×1 conv for
    N×C×H×W outputs, a linear map on the last dimension otherwise (N×C, or N×T×C token features)."""
    if student.shape == teacher.shape:
        return nn.Identity()
    image = student.dim() == 4
    rest = (lambda shape: shape[2:]) if image else (lambda shape: shape[:-1])
    if student.dim() != teacher.dim() or student.dim() < 2 or rest(student.shape) != rest(teacher.shape):
        raise ValueError(
            f"{NAME}: feature layer {name!r} outputs {tuple(student.shape)} in the student and "
            f"{tuple(teacher.shape)} in the teacher; only the channel count may differ"
        )
    if image:
        return nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False, device=student.device)
    return nn.Linear(student.shape[-1], teacher.shape[-1], bias=False, device=student.device)


def _epochs(spec: DistillationSpec) -> Iterator[int]:
    epoch = 0
    while spec.epochs == 0 or epoch < spec.epochs:
        yield epoch
        epoch += 1


def distill(student: nn.Module, teacher: nn.Module, spec: DistillationSpec, ctx: Context) -> nn.Module:
    """Fine-tune `student` (any model whose outputs match the teacher's shape) against `teacher`.

    Runs `spec.epochs` passes over `ctx.train_batches(epoch)`, stopping early after `spec.steps` optimiser
    steps when given (epochs=0 means "until the step budget is spent"). Every forward goes through
    `ctx.run`, so batches may be tensors, tuples or dicts. After each epoch, including one cut short by the
    step budget, `ctx.evaluate(student)` is called when given and its value passed to
    `ctx.on_epoch(epoch, metric)` (0-based epoch). Seeded from `ctx.seed` without touching the caller's
    RNG state; deterministic on CPU. Returns the student on `ctx.device`, in eval mode.
    """
    if ctx.train_batches is None:
        raise ValueError(f"{NAME}: the context has no train_batches; distillation needs training data")
    if spec.alpha < 1 and ctx.task_loss is None:
        raise ValueError(f"{NAME}: alpha={spec.alpha} < 1 mixes in the task loss, but the context has no task_loss")
    if ctx.distill_loss is not None:
        ctx.note(NAME, None, f"output loss: the workload's distill_loss (replaces the spec's loss {spec.loss!r})")
    device = torch.device(ctx.device)
    student.to(device)
    teacher_was_training = teacher.training
    teacher.to(device).eval()
    feature_modules(student, tuple(s for s, _ in spec.feature_pairs))
    feature_modules(teacher, tuple(t for _, t in spec.feature_pairs), "teacher")
    features = _Features(student, teacher, spec.feature_pairs if spec.feature_weight > 0 else ())
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(ctx.seed)
            _Loop(student, teacher, spec, ctx, device, features).train()
    finally:
        features.close()
        teacher.train(teacher_was_training)
    return student.eval()


def _projection_key(layer: str) -> str:
    """A ModuleDict key for a layer: no dots, and never the name of a ModuleDict attribute (`eval`, `update`)."""
    return "layer:" + layer.replace(".", "/")


@dataclass
class _Loop:
    """The optimisation loop of `distill` (RNG already seeded, hooks installed)."""

    student: nn.Module
    teacher: nn.Module
    spec: DistillationSpec
    ctx: Context
    device: torch.device
    features: _Features
    projections: nn.ModuleDict | None = None
    steps: int = 0
    epoch_batches: int = 0  # batches in the last whole epoch (0 during the first)

    def _lr_factor(self, epoch: int, batch: int) -> float:
        """The schedule's share of `lr` at this step: 1 for "constant"; for "cosine", a half cosine of the
        budget spent so far (the larger of the step and epoch fractions; within-epoch progress is known once
        one epoch has shown how many batches an epoch has)."""
        spec = self.spec
        if spec.schedule == "constant":
            return 1.0
        spent = [self.steps / spec.steps] if spec.steps else []
        if spec.epochs:
            spent.append((epoch + (batch / self.epoch_batches if self.epoch_batches else 0.0)) / spec.epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(spent))))

    def train(self) -> None:
        spec, ctx = self.spec, self.ctx
        self.projections = self._feature_projections()
        extra = [] if self.projections is None else list(self.projections.parameters())
        params = [p for p in [*self.student.parameters(), *extra] if p.requires_grad]
        if not params:
            raise ValueError(f"{NAME}: the student has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        losses: list[float] = []
        feature_losses: list[float] = []
        for epoch in _epochs(spec):
            loss, feature = self._epoch(epoch, optimizer)
            losses.append(loss)
            if feature is not None:
                feature_losses.append(feature)
            if ctx.evaluate is not None:
                metric = float(ctx.evaluate(self.student.eval()))
                if ctx.on_epoch is not None:
                    ctx.on_epoch(epoch, metric)
            if spec.steps and self.steps >= spec.steps:
                break
        extra_data = {"epoch_feature_losses": feature_losses} if self.projections is not None else {}
        output = "workload" if ctx.distill_loss is not None else spec.loss
        message = f"fine-tuned for {len(losses)} epoch(s), {self.steps} step(s)"
        ctx.note(NAME, None, message, epoch_losses=losses, output_loss=output, **extra_data)

    def _epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> tuple[float, float | None]:
        """One pass over the epoch's batches (cut short by the step budget): mean loss and feature term."""
        self.student.train()
        total, feature_total, batches = 0.0, 0.0, 0
        assert self.ctx.train_batches is not None, "distill() checks the training data before training"
        for inputs, targets in self.ctx.train_batches(epoch):
            inputs = to_device(inputs, self.device)
            targets = targets.to(self.device) if isinstance(targets, torch.Tensor) else targets
            with torch.no_grad():
                teacher_out = self.ctx.run(self.teacher, inputs)
            loss, feature = self._loss(self.ctx.run(self.student, inputs), teacher_out, inputs, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{NAME}: the loss became {float(loss.detach())} at epoch {epoch}, step {self.steps}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = self.spec.lr * self._lr_factor(epoch, batches)
            optimizer.step()
            total, batches, self.steps = total + float(loss.detach()), batches + 1, self.steps + 1
            feature_total += 0.0 if feature is None else float(feature.detach())
            if self.spec.steps and self.steps >= self.spec.steps:
                break
        if batches == 0:
            raise ValueError(f"{NAME}: train_batches({epoch}) yielded no batches")
        self.epoch_batches = batches
        return total / batches, (None if self.projections is None else feature_total / batches)

    def _feature_projections(self) -> nn.ModuleDict | None:
        """Projections from student to teacher features (None without feature distillation), sized by one
        probe in eval mode (BatchNorm statistics untouched)."""
        if not self.features.pairs:
            return None
        projections = nn.ModuleDict()
        self.student.eval()
        with torch.no_grad():
            example = to_device(self.ctx.example_inputs, self.device)
            self.ctx.run(self.student, example), self.ctx.run(self.teacher, example)
        for name, s, t in self.features.captured():
            projections[_projection_key(name)] = _projection(name, s, t)
        self.features.clear()
        return projections

    def _loss(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, inputs: Inputs, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """α·output loss + (1−α)·task loss (+ the feature term), and the feature term alone, for one batch."""
        spec, ctx = self.spec, self.ctx
        loss = spec.alpha * self._output_loss(student_out, teacher_out, inputs)
        if spec.alpha < 1:
            assert ctx.task_loss is not None, "distill() checks the task loss before training"
            loss = loss + (1 - spec.alpha) * ctx.task_loss(student_out, targets)
        feature = None
        if self.projections is not None:
            projections = self.projections
            terms = [F.mse_loss(projections[_projection_key(n)](s), t) for n, s, t in self.features.captured()]
            feature = torch.stack(terms).mean()
            loss = loss + spec.feature_weight * feature
        self.features.clear()
        return loss, feature

    def _output_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """The workload's distill_loss when given (it judges the shapes), else the spec's built-in loss."""
        if self.ctx.distill_loss is not None:
            value = self.ctx.distill_loss(student_out, teacher_out, inputs)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"{NAME}: the workload's distill_loss must return a one-element tensor")
            return value.reshape(())
        if student_out.shape != teacher_out.shape:
            raise ValueError(
                f"{NAME}: student outputs {tuple(student_out.shape)} but the teacher "
                f"{tuple(teacher_out.shape)}; they must match"
            )
        return output_loss(self.spec.loss, student_out, teacher_out, self.spec.temperature)


def apply_distillation(model: nn.Module, spec: DistillationSpec, ctx: Context) -> nn.Module:
    """Registered apply: distil `model` from `ctx.teacher` (the uncompressed original)."""
    feature_modules(model, tuple(s for s, _ in spec.feature_pairs))  # a bad spec fails before anything else
    if ctx.teacher is None:
        raise ValueError(f"{NAME}: the context has no teacher; pass the original model as ctx.teacher")
    return distill(model, ctx.teacher, spec, ctx)


register(
    Technique(
        name=NAME,
        spec_type=DistillationSpec,
        apply=apply_distillation,
        layer_types=(),
        stage=50,
        search=SearchSettings(
            globals=(
                GlobalSearch("temperature", bounds=(1.0, 8.0), reference=4.0),
                GlobalSearch("alpha", bounds=(0.1, 0.95), reference=0.7),
                GlobalSearch("epochs", choices=(2, 4, 8), reference=math.inf),  # references: the most offered
                # Optimiser-step budgets (ints, categorical). By default the single choice 0, "no step budget":
                # epochs alone decide. A workload or space file offers e.g. (100, 200, 400); with epochs=E the
                # fine-tune stops at whichever comes first, with epochs=0 it runs until the steps are spent.
                GlobalSearch("steps", choices=(0,), reference=math.inf),
                GlobalSearch("lr", bounds=(3e-4, 3e-3), log=True, reference=1e-3),
                # "constant" by default: on digits a cosine decay over 8 epochs left quarter-width students 6
                # points worse; over 32-40 epochs it made them steadier across seeds. A space file offers it.
                GlobalSearch("schedule", choices=("constant",), reference="constant"),
            ),
            prefix="distill",
            # A transformer fine-tunes at a small learning rate for a budget of optimiser steps, not epochs
            # (`epochs` 0: until the step budget is spent).
            attention_ranges=({"lr": (1e-5, 1e-4)}, {"steps": (100, 200, 400), "epochs": (0,)}),
        ),
        fine_tunes=True,
    )
)

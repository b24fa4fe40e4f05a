"""Knowledge distillation: the fine-tuning loop that trains a compressed student against its teacher.

Loss = alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · task loss, plus an
optional feature term: mean squared error between the outputs of same-named student and teacher layers,
through a learned 1×1 conv / linear projection when structured pruning changed the channel count (the
projection is training-only and never part of the returned model). Masks and fake-quant registered with
`torch.nn.utils.parametrize` stay in place: training updates their `original` tensors through them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

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

NAME = "distillation"
# Bounds of the settings (inclusive unless noted), chosen so that every valid spec trains with finite numbers.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 100.0  # logits / T and T² stay well inside float32
MAX_LR = 1.0  # lr in (0, MAX_LR]
MAX_WEIGHT_DECAY = 1.0  # AdamW shrinks weights by lr · weight_decay per step: at most all of them
MAX_EPOCHS = 1000
MAX_STEPS = 1_000_000
MAX_FEATURE_WEIGHT = 1e4  # the feature term times this stays finite in float32


@dataclass(frozen=True)
class DistillationSpec(TechniqueSpec):
    """Temperature, loss mix, budget (epochs and/or optimiser steps) and optimiser of the KD fine-tune.

    Valid values (numbers finite, never bools; ints accepted where a float is meant, never the reverse):
    `temperature` in [MIN_TEMPERATURE, MAX_TEMPERATURE] = [0.05, 100]; `alpha` in [0, 1]; `epochs` an integer
    in [0, MAX_EPOCHS] = [0, 1000]; `steps` null or an integer in [0, MAX_STEPS] = [0, 1_000_000] (0 or null:
    no step budget), and epochs and steps not both empty; `lr` in (0, MAX_LR] = (0, 1]; `weight_decay` in
    [0, MAX_WEIGHT_DECAY] = [0, 1]; `feature_weight` in [0, MAX_FEATURE_WEIGHT] = [0, 1e4], above 0 only
    with `feature_layers`, a list of distinct non-empty layer names.
    """

    technique: ClassVar[str] = NAME

    temperature: float = 4.0
    alpha: float = 0.7
    epochs: int = 2
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    feature_layers: tuple[str, ...] = ()
    feature_weight: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.feature_layers, list):
            object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
        super().__post_init__()

    def validate(self) -> None:
        check_range(NAME, "temperature", self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
        if not is_number(self.lr) or not 0 < self.lr <= MAX_LR:
            raise SpecError(f"{NAME}: lr must be in (0, {MAX_LR}], got {self.lr!r}")
        check_range(NAME, "alpha", self.alpha, 0.0, 1.0)
        check_range(NAME, "weight_decay", self.weight_decay, 0.0, MAX_WEIGHT_DECAY)
        check_range(NAME, "feature_weight", self.feature_weight, 0.0, MAX_FEATURE_WEIGHT)
        check_int(NAME, "epochs", self.epochs, 0, MAX_EPOCHS)
        if self.steps is not None:
            check_int(NAME, "steps", self.steps, 0, MAX_STEPS)
        if self.epochs == 0 and not self.steps:
            raise SpecError(f"{NAME}: the budget is empty; give epochs > 0 and/or steps > 0")
        if not isinstance(self.feature_layers, tuple) or not all(
            isinstance(name, str) and name for name in self.feature_layers
        ):
            raise SpecError(f"{NAME}: feature_layers must be a list of layer names, got {self.feature_layers!r}")
        repeated = sorted({name for name in self.feature_layers if self.feature_layers.count(name) > 1})
        if repeated:
            raise SpecError(f"{NAME}: feature_layers names {', '.join(map(repr, repeated))} more than once")
        if self.feature_weight > 0 and not self.feature_layers:
            raise SpecError(f"{NAME}: feature_weight {self.feature_weight} needs feature_layers")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of temperature-softened class distributions (classes on dim 1)."""
    classes = student.shape[1]
    s = student.movedim(1, -1).reshape(-1, classes) / temperature
    t = teacher.movedim(1, -1).reshape(-1, classes) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def feature_modules(model: nn.Module, names: tuple[str, ...], role: str = "student") -> list[nn.Module]:
    """The modules `names` address in `model`; SpecError naming the first missing one."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise SpecError(f"{NAME}: feature layer {missing[0]!r} is not a module of the {role}")
    return [modules[name] for name in names]


class _Features:
    """Forward hooks capturing the outputs of named layers of a student and its teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: tuple[str, ...]) -> None:
        self.names = names
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}
        self.handles = []
        for role, model in (("student", student), ("teacher", teacher)):
            for name, module in zip(names, feature_modules(model, names, role), strict=True):
                self.handles.append(module.register_forward_hook(self._hook(role, name)))

    def _hook(self, role: str, name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise SpecError(f"{NAME}: feature layer {name!r} of the {role} does not output a tensor")
            self.outputs[role, name] = output

        return hook

    def pairs(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for name in self.names:
            yield name, self.outputs.pop(("student", name)), self.outputs.pop(("teacher", name))

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
    steps when given (epochs=0 means "until the step budget is spent"). After each epoch, including one cut
    short by the step budget, `ctx.evaluate(student)` is called when given and its value passed to
    `ctx.on_epoch(epoch, metric)` (0-based epoch). Seeded from `ctx.seed` without touching the caller's
    RNG state; deterministic on CPU. Returns the student on `ctx.device`, in eval mode.
    """
    if ctx.train_batches is None:
        raise ValueError(f"{NAME}: the context has no train_batches; distillation needs training data")
    if spec.alpha < 1 and ctx.task_loss is None:
        raise ValueError(f"{NAME}: alpha={spec.alpha} < 1 mixes in the task loss, but the context has no task_loss")
    device = torch.device(ctx.device)
    student.to(device)
    teacher_was_training = teacher.training
    teacher.to(device).eval()
    features = _Features(student, teacher, spec.feature_layers)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(ctx.seed)
            _train(student, teacher, spec, ctx, device, features)
    finally:
        features.close()
        teacher.train(teacher_was_training)
    return student.eval()


def _projection_key(layer: str) -> str:
    """A ModuleDict key for a layer: no dots, and never the name of a ModuleDict attribute (`eval`, `update`)."""
    return "layer:" + layer.replace(".", "/")


def _feature_projections(
    student: nn.Module,
    teacher: nn.Module,
    spec: DistillationSpec,
    ctx: Context,
    device: torch.device,
    features: _Features,
) -> nn.ModuleDict | None:
    """Projections from student to teacher features (None without feature distillation), sized by one probe
    in eval mode (BatchNorm statistics untouched)."""
    if not spec.feature_layers or spec.feature_weight <= 0:
        return None
    projections = nn.ModuleDict()
    student.eval()
    with torch.no_grad():
        example = ctx.example_inputs.to(device)
        student(example), teacher(example)
    for name, s, t in features.pairs():
        projections[_projection_key(name)] = _projection(name, s, t)
    return projections


def _loss(
    spec: DistillationSpec,
    ctx: Context,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    targets: torch.Tensor,
    features: _Features,
    projections: nn.ModuleDict | None,
) -> torch.Tensor:
    """α·T²·KL + (1−α)·task loss (+ the feature term), for one batch."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(
            f"{NAME}: student outputs {tuple(student_out.shape)} but the teacher "
            f"{tuple(teacher_out.shape)}; they must match"
        )
    loss = spec.alpha * kd_loss(student_out, teacher_out, spec.temperature)
    if spec.alpha < 1:
        assert ctx.task_loss is not None, "distill() checks the task loss before training"
        loss = loss + (1 - spec.alpha) * ctx.task_loss(student_out, targets)
    if projections is not None:
        terms = [F.mse_loss(projections[_projection_key(n)](s), t) for n, s, t in features.pairs()]
        loss = loss + spec.feature_weight * torch.stack(terms).mean()
    features.outputs.clear()
    return loss


def _train(
    student: nn.Module,
    teacher: nn.Module,
    spec: DistillationSpec,
    ctx: Context,
    device: torch.device,
    features: _Features,
) -> None:
    """The optimisation loop of `distill` (RNG already seeded, hooks installed)."""
    projections = _feature_projections(student, teacher, spec, ctx, device, features)
    extra = [] if projections is None else list(projections.parameters())
    params = [p for p in [*student.parameters(), *extra] if p.requires_grad]
    if not params:
        raise ValueError(f"{NAME}: the student has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps, losses = 0, []
    for epoch in _epochs(spec):
        student.train()
        total, batches = 0.0, 0
        assert ctx.train_batches is not None, "distill() checks the training data before training"
        for inputs, targets in ctx.train_batches(epoch):
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.no_grad():
                teacher_out = teacher(inputs)
            loss = _loss(spec, ctx, student(inputs), teacher_out, targets, features, projections)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{NAME}: the loss became {float(loss.detach())} at epoch {epoch}, step {steps}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches, steps = total + float(loss.detach()), batches + 1, steps + 1
            if spec.steps and steps >= spec.steps:
                break
        if batches == 0:
            raise ValueError(f"{NAME}: train_batches({epoch}) yielded no batches")
        losses.append(total / batches)
        if ctx.evaluate is not None:
            metric = float(ctx.evaluate(student.eval()))
            if ctx.on_epoch is not None:
                ctx.on_epoch(epoch, metric)
        if spec.steps and steps >= spec.steps:
            break
    ctx.note(NAME, None, f"fine-tuned for {len(losses)} epoch(s), {steps} step(s)", epoch_losses=losses)


def apply_distillation(model: nn.Module, spec: DistillationSpec, ctx: Context) -> nn.Module:
    """Registered apply: distil `model` from `ctx.teacher` (the uncompressed original)."""
    feature_modules(model, spec.feature_layers)  # a bad spec fails before anything else is checked
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
                GlobalSearch("lr", bounds=(3e-4, 3e-3), log=True, reference=1e-3),
            ),
            prefix="distill",
        ),
        fine_tunes=True,
    )
)

"""Student: replace the model by a lighter architecture (the workload's `build_student(width)`) to distil into.

The student is a whole-model change with one setting, `width` (a multiplier in (0, 1) that the workload's
builder interprets: narrower channels for a CNN, fewer heads / a narrower feed-forward for a transformer).
It runs before every other technique (stage 5), so later steps of the policy act on the student's layers, and
the policy's distillation step (from the uncompressed teacher, `ctx.teacher`) trains it.

Decisions:
- A fresh student is untrained: a policy with a student step must fine-tune after it (`require_fine_tune`,
  a SpecError otherwise); the executor checks it before any work, like the rest of policy validation.
- Initialisation (`init`): "teacher" (default) copies, for every tensor the student shares by name with the
  incoming model and whose every dimension is no larger, the teacher's leading slice (the first channels,
  heads or layers), which keeps the student's activations on the teacher's scale (calibrated activation
  quantisation after this step sees sensible ranges); tensors that do not fit keep the builder's init.
  "random" keeps the builder's init. Either way the builder runs seeded from `ctx.seed`, so applying a policy
  is deterministic. A note records the width, the parameter counts and how many tensors came from the teacher.
- The checkpoint of a student policy is written and rebuilt against `build_student(width)`, not the
  workload's `build_model()` (`base_architecture`), so its structure record only holds what later steps
  changed and a reload is exact.
- Per-layer settings of later steps address the student's layer names (the teacher's names where the
  student keeps them, as a narrower CNN does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from techniques._base import (
    Context,
    GlobalSearch,
    SearchSettings,
    SpecError,
    Technique,
    TechniqueSpec,
    get,
    is_number,
    register,
)

NAME = "student"
WIDTHS = (0.25, 0.5, 0.75)  # the widths a search tries
INITS = ("teacher", "random")
StudentBuilder = Callable[[float], nn.Module]


@dataclass(frozen=True)
class StudentSpec(TechniqueSpec):
    """`width`: a number in (0, 1), the multiplier the workload's `build_student` takes; `init`: one of INITS,
    "teacher" (leading slices of the teacher's tensors where shapes allow) or "random" (the builder's init)."""

    technique: ClassVar[str] = NAME

    width: float
    init: str = "teacher"

    def validate(self) -> None:
        if not is_number(self.width) or not 0 < self.width < 1:
            raise SpecError(f"{NAME}: width must be a number in (0, 1), got {self.width!r}")
        if self.init not in INITS:
            raise SpecError(f"{NAME}: init must be one of {', '.join(INITS)}, got {self.init!r}")


def student_step(steps: Sequence[TechniqueSpec]) -> StudentSpec | None:
    """The policy's student step, if it has one."""
    return next((step for step in steps if isinstance(step, StudentSpec)), None)


def require_fine_tune(steps: Sequence[TechniqueSpec]) -> None:
    """SpecError unless every student step is followed by a fine-tuning step (distillation trains it)."""
    for index, step in enumerate(steps):
        if isinstance(step, StudentSpec) and not any(get(later.technique).fine_tunes for later in steps[index + 1 :]):
            raise SpecError(
                f"{NAME}: a student is built untrained; the policy needs a distillation step after it to train it"
            )


def build(build_student: StudentBuilder | None, width: float) -> nn.Module:
    """`build_student(width)`, or SpecError when the workload cannot build a student."""
    if build_student is None:
        raise SpecError(
            f"{NAME}: the workload has no build_student, so it has no lighter architecture to distil into; "
            "drop the student step or give the workload a build_student(width)"
        )
    model = build_student(width)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{NAME}: build_student({width}) returned a {type(model).__name__}, not a torch module")
    return model


def base_architecture(
    steps: Sequence[TechniqueSpec], build_model: Callable[[], nn.Module], build_student: StudentBuilder | None
) -> nn.Module:
    """The untrained architecture a policy's model is built on: the student's when the policy has a student
    step (SpecError when there is no builder), else `build_model()`."""
    spec = student_step(steps)
    return build_model() if spec is None else build(build_student, spec.width)


def copy_leading_slices(student: nn.Module, teacher: nn.Module) -> int:
    """Copy into each student tensor the leading slice of the same-named teacher tensor, where it has the same
    rank and dtype and no dimension is larger; return how many tensors were copied."""
    source = teacher.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in student.state_dict().items():  # state_dict tensors share the module's storage
            original = source.get(name)
            if (
                original is None
                or original.dim() != tensor.dim()
                or original.dtype != tensor.dtype
                or any(s > t for s, t in zip(tensor.shape, original.shape, strict=True))
            ):
                continue
            tensor.copy_(original[tuple(slice(0, s) for s in tensor.shape)])
            copied += 1
    return copied


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_outputs(student: nn.Module, teacher: nn.Module, spec: StudentSpec, ctx: Context) -> None:
    """The student's output must have the teacher's shape on the example inputs, or distillation cannot compare."""
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    try:
        with torch.no_grad():
            got, expected = ctx.run(student, ctx.example_inputs).shape, ctx.run(teacher, ctx.example_inputs).shape
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    if got != expected:
        raise SpecError(
            f"{NAME}: the student of width {spec.width} outputs {tuple(got)}, the teacher {tuple(expected)}"
        )


def apply_student(model: nn.Module, spec: StudentSpec, ctx: Context) -> nn.Module:
    """Registered apply: a new, untrained student of `spec.width` in place of `model` (its teacher)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        student = build(ctx.build_student, spec.width)
    device = next((p.device for p in model.parameters()), ctx.device)
    student.to(device).train(model.training)
    copied = copy_leading_slices(student, model) if spec.init == "teacher" else 0
    total = len(student.state_dict())
    _check_outputs(student, model, spec, ctx)
    params, teacher_params = _parameters(student), _parameters(model)
    init = f"{copied} of {total} tensors from the teacher's leading slices" if copied else "the builder's init"
    ctx.note(
        NAME,
        None,
        f"width {spec.width}: {params} parameters ({params / max(teacher_params, 1):.0%} of the teacher's), {init}",
        width=spec.width,
        params=params,
        teacher_params=teacher_params,
        copied_tensors=copied,
    )
    return student


register(
    Technique(
        name=NAME,
        spec_type=StudentSpec,
        apply=apply_student,
        layer_types=(),
        stage=5,
        search=SearchSettings(globals=(GlobalSearch("width", choices=WIDTHS, reference=0.5),)),
        structural=True,
    )
)

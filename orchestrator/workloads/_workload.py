"""The workload contract: everything the orchestrator knows about a user's problem."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orchestrator.workloads._reduction import OutputFn, reduce_output, takes_batch
from orchestrator.workloads._unused import unused_layers
from orchestrator.workloads.data import DataSplit
from techniques.tools.inputs import Inputs, call_model, main_output, to_device

SPLITS = ("train", "calibration", "validation", "test")
METRIC_DIRECTIONS = ("maximize", "minimize")


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((logits.argmax(dim=1) == targets).float().mean())


@dataclass(frozen=True)
class Workload:
    """A model to compress, its data, and how to score it.

    - `build_model()` returns the untrained architecture (checkpoints rebuild from it);
    - `load_baseline()` returns the trained baseline (trained on first use and cached, or loaded);
    - `splits` holds "train", "calibration", "validation" and "test" (the search only sees validation;
      test is touched once, for the final models), each a `Split` of tensors or a `LoaderSplit` over the
      user's own DataLoader; a batch's inputs are a tensor (`model(x)`), a tuple (`model(*x)`) or a dict
      (`model(**x)`);
    - `output_fn(outputs)` reduces what the model returns to the tensor metrics and losses read (default
      `main_output`: the tensor itself, `logits` of a ModelOutput / dict, the first item of a tuple);
      `output_fn(outputs, batch)` also sees the batch the model was called with (mean pooling over the
      attention mask), see `orchestrator.workloads._reduction`;
    - `metric_fn(outputs, targets)` is the metric, named `metric_name`, higher-is-better unless
      `metric_direction` is "minimize" (perplexity: the accuracy guard then reads as a fraction of the
      baseline, see `orchestrator.pareto.shortfall`);
    - `loss_fn(outputs, targets)` is the fine-tuning task loss;
    - `output_error_fn(outputs, reference_outputs)` optionally says how far a model's outputs are from the
      original's (0: the same), the cheap fidelity the sensitivity profile ranks settings by (default: relative
      squared error; a language model's KL divergence to the original's next-token distribution);
    - `distill_loss(student_out, teacher_out, inputs)` optionally replaces distillation's built-in output
      loss (e.g. cosine for embeddings);
    - `search_ranges` optionally overrides the search's default ranges of global settings, as a search-space
      file does (e.g. `{"distill.lr": (1e-5, 1e-4), "distill.steps": [100, 200]}`); a file still wins;
    - `fingerprint` identifies the recipe (architecture, data, training), so checkpoints from another
      workload are recognised;
    - `build_student(width)` optionally returns a lighter architecture for distillation;
    - `prepare_fn(inputs)` optionally turns stored inputs (e.g. uint8 images) into model inputs.
    """

    name: str
    build_model: Callable[[], nn.Module]
    load_baseline: Callable[[], nn.Module]
    splits: Mapping[str, DataSplit]
    fingerprint: str
    metric_name: str = "accuracy"
    metric_fn: Callable[[torch.Tensor, torch.Tensor], float] = accuracy
    metric_direction: str = "maximize"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    output_error_fn: Callable[[torch.Tensor, torch.Tensor], float] | None = None
    batch_size: int = 128
    build_student: Callable[[float], nn.Module] | None = None
    prepare_fn: Callable[[Inputs], Inputs] | None = None
    output_fn: OutputFn = main_output
    distill_loss: Callable[[torch.Tensor, torch.Tensor, Inputs], torch.Tensor] | None = None
    search_ranges: Mapping[str, Any] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    _reduction_takes_batch: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"workload {self.name!r} lacks split(s) {', '.join(missing)}")
        if self.metric_direction not in METRIC_DIRECTIONS:
            choices = ", ".join(METRIC_DIRECTIONS)
            raise ValueError(f"metric_direction is one of {choices}, got {self.metric_direction!r}")
        object.__setattr__(self, "_reduction_takes_batch", takes_batch(self.output_fn))

    def example_inputs(self, batch_size: int = 1, device: torch.device | str = "cpu") -> Inputs:
        """Real inputs (from the validation split) for tracing and latency, as the model takes them."""
        return to_device(self.prepare(self.splits["validation"].first_inputs(batch_size)), device)

    def prepare(self, inputs: Inputs) -> Inputs:
        """Stored inputs as the model takes them (stored uint8 images are scaled here)."""
        return self.prepare_fn(inputs) if self.prepare_fn else inputs

    def reduce(self, outputs: Any, inputs: Inputs) -> torch.Tensor:
        """What the model returned on `inputs`, reduced by `output_fn` (given the batch when it asks for it)."""
        return reduce_output(self.output_fn, outputs, inputs, with_batch=self._reduction_takes_batch)

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """The model's output tensor on prepared inputs (called as the batch's structure says, reduced by
        `output_fn`)."""
        return self.reduce(call_model(model, inputs), inputs)

    def batches(self, split: str, *, shuffle_seed: int | None = None, device: torch.device | str = "cpu"):
        """(inputs, targets) batches of a split, ready for the model."""
        for x, y in self.splits[split].batches(self.batch_size, shuffle_seed=shuffle_seed, device=device):
            yield self.prepare(x), y

    def evaluate(self, model: nn.Module, split: str = "validation", device: torch.device | str | None = None) -> float:
        """The metric of `model` on a split (model put in eval mode, no gradients)."""
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model.eval()
        return self.score(lambda inputs: call_model(model, inputs), split, device)

    def score(
        self, run: Callable[[Inputs], Any], split: str = "validation", device: torch.device | str = "cpu"
    ) -> float:
        """The metric on a split of whatever `run(batch)` returns as the model's outputs (a PyTorch model, or
        an exported artifact in its runtime), batched and reduced as `evaluate` does, with no gradients."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
        outputs, targets = [], []
        with torch.inference_mode():
            for x, y in self.batches(split, device=device):
                outputs.append(self.reduce(run(x), x).float().cpu())
                targets.append(y.cpu())
        return self.metric_fn(torch.cat(outputs), torch.cat(targets))

    def unused_layers(self, model: nn.Module) -> list[str]:
        """The layers of `model` none of its outputs depends on (BERT's pooler under a module reading only
        hidden states), found on two validation examples: exports leave them out of the graph."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return unused_layers(model, self.example_inputs(2, device))

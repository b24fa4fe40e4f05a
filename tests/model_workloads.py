"""Workloads around models we did not write (a Hugging Face BERT, torchvision's ResNet-18) and a dict-input
model, built with the notebook API; importable as `tests.model_workloads:NAME` from a fresh process."""

from __future__ import annotations

import torch

from orchestrator.api import workload_from
from orchestrator.workloads import Workload
from tests.tiny_models import DictInputNet, dict_data, seeded, text_data, tiny_bert


def bert_workload() -> Workload:
    """The tiny random-initialised HF BERT on random token ids (two inputs: ids and mask)."""
    train, validation = text_data(64, seed=0), text_data(32, seed=1)
    return workload_from(model=tiny_bert(), train=train, validation=validation, batch_size=16, name="tiny-bert")


def resnet18_workload() -> Workload:
    """torchvision's ResNet-18 (10 classes) on random 3×32×32 images."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(1))
    train, validation = (images[:32], labels[:32]), (images[32:], labels[32:])
    return workload_from(model=model, train=train, validation=validation, batch_size=16, name="resnet18")


def dict_workload() -> Workload:
    """A model called as `model(image=..., extra=...)` that returns a dict with `logits`."""
    train, validation = dict_data(64, seed=0), dict_data(32, seed=1)
    return workload_from(model=seeded(DictInputNet), train=train, validation=validation, batch_size=16, name="dict")


def loss_workload() -> Workload:
    """The dict-input model scored by its cross-entropy (lower is better, as perplexity is)."""
    train, validation = dict_data(64, seed=0), dict_data(32, seed=1)
    return workload_from(
        model=seeded(DictInputNet),
        train=train,
        validation=validation,
        metric=mean_cross_entropy,
        metric_direction="minimize",
        batch_size=16,
        name="dict-loss",
    )


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, targets))

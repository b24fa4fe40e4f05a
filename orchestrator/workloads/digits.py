"""Built-in `digits` workload: scikit-learn's bundled 8×8 digits and a small CNN, trained in seconds."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from orchestrator.files.digest import tensor_digest
from orchestrator.workloads._baseline import cached_baseline, recipe_hash, recipe_trainer
from orchestrator.workloads._workload import Workload
from orchestrator.workloads.data import Split

RECIPE: dict[str, Any] = {"arch": "DigitsCNN", "width": 1.0, "epochs": 40, "lr": 3e-3, "batch_size": 64, "seed": 0}


class DigitsCNN(nn.Module):
    """Three conv blocks and two linear layers on 1×8×8 images (about 190k parameters at width 1)."""

    def __init__(self, width: float = 1.0, classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3, hidden = (max(1, round(c * width)) for c in (32, 64, 64, 128))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc1 = nn.Linear(c3 * 16, hidden)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc2(self.dropout(torch.relu(self.fc1(x.flatten(1)))))


def load_splits(seed: int = 0) -> dict[str, Split]:
    """Fixed, seeded, stratified 70/15/15 train/validation/test splits; calibration is 256 train images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    index = torch.arange(len(y)).numpy()
    train_idx, rest = train_test_split(index, test_size=0.3, stratify=data.target, random_state=seed)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=data.target[rest], random_state=seed)
    train = Split(x[train_idx], y[train_idx])
    return {
        "train": train,
        "calibration": train.subset(256),
        "validation": Split(x[val_idx], y[val_idx]),
        "test": Split(x[test_idx], y[test_idx]),
    }


def make_digits() -> Workload:
    """The default workload: every technique has convolutions and linear layers to act on."""
    splits = load_splits(RECIPE["seed"])
    recipe = {**RECIPE, "data": tensor_digest(*splits["train"].digest_tensors())}
    build = functools.partial(DigitsCNN, RECIPE["width"])
    train = recipe_trainer(RECIPE, splits["train"], "digits")
    return Workload(
        name="digits",
        build_model=build,
        load_baseline=functools.partial(cached_baseline, "digits", recipe, build, train),
        splits=splits,
        fingerprint=f"digits-{recipe_hash(recipe)}",
        batch_size=128,
        build_student=lambda width: DigitsCNN(width),
        info={"recipe": recipe},
    )

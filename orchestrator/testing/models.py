"""A tiny seeded model and data the technique contract runs on by default (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv blocks and two linear layers on 1×8×8 inputs: something for every technique."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 16, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def seeded(model_cls: type[nn.Module] = TinyCNN, seed: int = 0, **kwargs: object) -> nn.Module:
    """A model with seeded random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = model_cls(**kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None and module.running_var is not None:
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_data(n: int = 64, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 1×8×8 inputs with labels a fixed random linear rule assigns (learnable, not noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    rule = torch.randn(64, classes, generator=torch.Generator().manual_seed(1234))
    y = (x.flatten(1) @ rule).argmax(dim=1)
    return x, y

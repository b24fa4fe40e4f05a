"""In-memory data splits and deterministic batching."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """Inputs and targets of one split, held as tensors (inputs may be uint8, converted per batch)."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def batches(
        self, batch_size: int, *, shuffle_seed: int | None = None, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in order, or in a permutation fixed by `shuffle_seed` (the same seed, the same order)."""
        if shuffle_seed is None:
            order = torch.arange(len(self))
        else:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(shuffle_seed))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            yield self.inputs[index].to(device), self.targets[index].to(device)

    def subset(self, count: int) -> Split:
        """The first `count` examples."""
        return Split(self.inputs[:count], self.targets[:count])

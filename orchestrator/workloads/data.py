"""Data splits: in-memory tensors (`Split`) or a user's own re-iterable batches (`LoaderSplit`), batched
deterministically.

Inputs are a tensor, a tuple of tensors or a dict of tensors (`techniques.tools.inputs`), batch on dim 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from techniques.tools.inputs import Inputs, batch_length, first_rows, take_rows, tensors, to_device

Batch = tuple[Inputs, torch.Tensor]


@dataclass(frozen=True)
class Split:
    """Inputs and targets of one split, held as tensors (inputs may be uint8, converted per batch)."""

    inputs: Inputs
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if isinstance(self.inputs, list):
            object.__setattr__(self, "inputs", tuple(self.inputs))
        if not isinstance(self.targets, torch.Tensor):
            raise TypeError(f"targets must be a tensor, got {type(self.targets).__name__}")
        if batch_length(self.inputs) != len(self.targets):
            raise ValueError(f"{batch_length(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def batches(
        self, batch_size: int, *, shuffle_seed: int | None = None, device: torch.device | str = "cpu"
    ) -> Iterator[Batch]:
        """Batches in order, or in a permutation fixed by `shuffle_seed` (the same seed, the same order)."""
        if shuffle_seed is None:
            order = torch.arange(len(self))
        else:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(shuffle_seed))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            yield to_device(take_rows(self.inputs, index), device), self.targets[index].to(device)

    def batch_count(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def first_inputs(self, count: int) -> Inputs:
        """The inputs of the first `count` examples."""
        return first_rows(self.inputs, count)

    def subset(self, count: int) -> Split:
        """The first `count` examples."""
        return Split(first_rows(self.inputs, count), self.targets[:count])

    def digest_tensors(self) -> list[torch.Tensor]:
        """The tensors that identify this split's data (for recipe digests)."""
        return [*tensors(self.inputs), self.targets]


@dataclass(frozen=True)
class LoaderSplit:
    """A split read from a user's re-iterable source of `(inputs, targets)` batches, e.g. a `DataLoader`.

    The loader's own batch size is kept. For a shuffling DataLoader without its own `generator`, the order is
    fixed by the shuffle seed (torch's random state is seeded while the iterator starts, then restored), so the
    same seed gives the same batches; a loader with its own generator or fixed order keeps its order.
    `max_examples` stops after that many examples (a calibration set taken from a training loader).
    """

    loader: Iterable[Any]
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loader, Iterator):
            raise TypeError("a split needs a re-iterable source (a DataLoader or a list), not a one-shot iterator")

    def __len__(self) -> int:
        dataset = getattr(self.loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and self.max_examples is None:
            return len(dataset)
        return sum(len(targets) for _, targets in self._pairs(None))

    def batches(
        self, batch_size: int, *, shuffle_seed: int | None = None, device: torch.device | str = "cpu"
    ) -> Iterator[Batch]:
        """The loader's batches (`batch_size` is the loader's own), moved to `device`."""
        for inputs, targets in self._pairs(shuffle_seed):
            yield to_device(inputs, device), targets.to(device)

    def batch_count(self, batch_size: int) -> int:
        """How many batches the loader yields (`batch_size` is the loader's own)."""
        if hasattr(self.loader, "__len__") and self.max_examples is None:
            return len(self.loader)  # type: ignore[arg-type]
        return sum(1 for _ in self._pairs(None))

    def first_inputs(self, count: int) -> Inputs:
        """The inputs of the first `count` examples (from the first batch)."""
        for inputs, _ in self._pairs(None):
            return first_rows(inputs, count)
        raise ValueError("the data loader yielded no batches")

    def _pairs(self, shuffle_seed: int | None) -> Iterator[Batch]:
        with torch.random.fork_rng(devices=[]):
            if shuffle_seed is not None:
                torch.manual_seed(shuffle_seed)
            iterator = iter(self.loader)
            first = next(iterator, None)
        if first is None:
            return
        left = self.max_examples
        for batch in itertools.chain([first], iterator):
            inputs, targets = as_batch(batch)
            if left is not None:
                inputs, targets = first_rows(inputs, left), targets[:left]
                left -= len(targets)
            yield inputs, targets
            if left is not None and left <= 0:
                return


def as_batch(batch: Any) -> Batch:
    """`(inputs, targets)` from what a loader yields: a pair, or a mapping with a `labels` / `targets` entry."""
    if isinstance(batch, Mapping):
        key = next((k for k in ("labels", "targets", "label") if k in batch), None)
        if key is None:
            raise ValueError(f"a dict batch needs a 'labels' or 'targets' entry; it has {', '.join(map(str, batch))}")
        return {k: v for k, v in batch.items() if k != key}, torch.as_tensor(batch[key])
    if isinstance(batch, Sequence) and len(batch) == 2:
        inputs, targets = batch
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        tensors(inputs)
        return inputs, torch.as_tensor(targets)
    raise ValueError(f"a batch must be (inputs, targets) or a dict with 'labels'; got {type(batch).__name__}")


DataSplit = Split | LoaderSplit


def split_of(data: Any) -> DataSplit:
    """A split from what a user hands over: a Split / LoaderSplit as is, `(inputs, targets)` tensors, or a
    re-iterable of batches such as a DataLoader."""
    if isinstance(data, Split | LoaderSplit):
        return data
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return Split(data[0], data[1])
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | torch.Tensor):
        return LoaderSplit(data)
    raise TypeError(f"data must be (inputs, targets) tensors or an iterable of batches, got {type(data).__name__}")

"""A user workload, as in the README's "Workloads" section, self-contained: synthetic data from a seeded
generator and a small MLP trained in about a second on first use (kept in memory for the process).

    python -m orchestrator baseline --workload examples.my_workload:make_workload
    python search.py --workload examples.my_workload:make_workload --num-trials 8

Run from the repository root (the module must be importable; on a cluster, on every node). Your own
`baseline()` would load trained weights instead, e.g. `load_file("net.safetensors")` from safetensors.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from orchestrator import Split, Workload

FEATURES, CLASSES, SEED = 20, 4, 0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(FEATURES, 64), nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """2000 seeded examples: the class is which of the first four features is largest."""
    x = torch.randn(2000, FEATURES, generator=torch.Generator().manual_seed(SEED))
    return x, x[:, :CLASSES].argmax(1)


@functools.cache
def trained_weights() -> dict[str, torch.Tensor]:
    """Train the baseline once per process (full-batch Adam, seeded: every process gets the same weights)."""
    x, y = make_data()
    torch.manual_seed(SEED)
    model = Net()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        optimiser.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_workload(data_dir: str | None = None) -> Workload:
    """The workload: called with data_dir= when --data-dir is given (unused here)."""
    x, y = make_data()
    train, val, test = Split(x[:1400], y[:1400]), Split(x[1400:1700], y[1400:1700]), Split(x[1700:], y[1700:])

    def baseline() -> nn.Module:  # your trained model: load your weights here
        model = Net()
        model.load_state_dict(trained_weights())
        return model.eval()

    return Workload(
        name="my-task",
        build_model=Net,  # the untrained architecture (checkpoints rebuild from it)
        load_baseline=baseline,
        splits={"train": train, "calibration": train.subset(256), "validation": val, "test": test},
        fingerprint="my-task-v1",  # change it when the model or data change
    )

"""The notebook API: your trained model and DataLoaders in, a front of compressed checkpoints out.

    python examples/notebook.py      (writes runs/model-<time>/: tables, checkpoints, report.html)
"""

import torch
from torch.utils.data import DataLoader, TensorDataset, random_split

import orchestrator

torch.manual_seed(0)
x = torch.randn(1200, 20)
train_set, val_set = random_split(TensorDataset(x, x[:, :4].argmax(1)), [1000, 200])  # your data
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
optimiser, train = torch.optim.Adam(model.parameters(), lr=1e-2), DataLoader(train_set, batch_size=25, shuffle=True)
for inputs, targets in train:  # your training
    optimiser.zero_grad()
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    optimiser.step()

outcome = orchestrator.compress(model=model, train=train, validation=DataLoader(val_set, batch_size=100), num_trials=6)
print(f"{len(outcome.pareto)} models on the front: {outcome.checkpoints}")

"""Train a baseline once and cache it on disk, keyed by a hash of its recipe."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.files.fs import cache_root
from orchestrator.files.weights import load_weights, save_weights
from orchestrator.workloads._reduction import OutputFn, reduce_output, takes_batch
from orchestrator.workloads.data import DataSplit
from techniques.tools.inputs import Inputs, call_model, main_output


def cache_dir() -> Path:
    """Where trained baselines are kept: `baselines/` in the tool's cache."""
    return cache_root() / "baselines"


# Bump when the training procedure changes in a way the recipe does not show, so stale caches are not reused.
TRAINER_VERSION = 2


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """The cache key of a recipe: its JSON and the trainer's version, hashed."""
    keyed = {**recipe, "trainer_version": TRAINER_VERSION}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def progress(message: str) -> None:
    """Console progress for long work (stderr, so stdout stays parseable)."""
    print(message, file=sys.stderr, flush=True)


def train_classifier(
    model: nn.Module,
    train: DataSplit,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    prepare: Callable[[Inputs], Inputs] | None = None,
    output_fn: OutputFn = main_output,
    label: str = "baseline",
) -> nn.Module:
    """Plain supervised training (AdamW, one-cycle schedule, cross-entropy), seeded, with per-epoch progress;
    batches may be tensors, tuples or dicts, outputs reduced by `output_fn` to class scores on dim 1 (a
    language model's (batch, vocabulary, tokens) against (batch, tokens) next-token targets, as
    `cross_entropy` takes them)."""
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    with_batch = takes_batch(output_fn)
    steps = epochs * train.batch_count(batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in train.batches(batch_size, shuffle_seed=seed * 1000 + epoch):
            x = prepare(x) if prepare else x
            optimiser.zero_grad()
            out = reduce_output(output_fn, call_model(model, x), x, with_batch=with_batch)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            optimiser.step()
            schedule.step()
            loss_sum += loss.item() * y.numel()  # per target: an example, or each token of a sequence
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
        progress(
            f"  training {label}: epoch {epoch + 1}/{epochs}  loss {loss_sum / total:.4f}  "
            f"train acc {correct / total:.4f}  ({time.perf_counter() - start:.1f}s)"
        )
    return model.eval()


def recipe_trainer(
    recipe: Mapping[str, Any], train: DataSplit, label: str, **options: Any
) -> Callable[[nn.Module], nn.Module]:
    """`train_classifier` on `train` with the recipe's epochs, lr, batch size and seed (`options`: prepare,
    output_fn)."""
    return functools.partial(
        train_classifier,
        train=train,
        epochs=recipe["epochs"],
        lr=recipe["lr"],
        batch_size=recipe["batch_size"],
        seed=recipe["seed"],
        label=label,
        **options,
    )


def cached_baseline(
    name: str, recipe: Mapping[str, Any], build: Callable[[], nn.Module], train: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """The trained baseline for `recipe`: loaded from the cache if present, else trained and cached."""
    key = recipe_hash(recipe)
    path = cache_dir() / f"{name}-{key}.safetensors"
    torch.manual_seed(int(recipe.get("seed", 0)))  # the initial weights are part of the recipe
    model = build()
    if path.exists():
        try:
            model.load_state_dict(load_weights(path))
        except Exception as exc:  # a damaged cache entry is retrained, never trusted
            progress(f"cached baseline {path} is unreadable ({exc.__class__.__name__}); retraining")
            model = build()
        else:
            progress(f"reusing cached baseline {path} (recipe {key}); no retraining")
            return model.eval()
    progress(f"training baseline for {name} (recipe {key}); cached at {path} for next time")
    model = train(model)
    save_weights(model, path)
    (path.with_suffix(".json")).write_text(json.dumps(dict(recipe), indent=2, sort_keys=True))
    return model.eval()

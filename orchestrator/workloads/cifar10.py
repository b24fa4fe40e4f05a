"""Built-in `cifar10` workload: ResNet-18 adapted to 32×32 on the CIFAR-10 python batches in a local directory.

Nothing is downloaded. The batches are Python pickles; they are read with an unpickler that can only
build dicts, lists, strings, numbers and numpy arrays, so a malicious file cannot run code.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from orchestrator.errors import UserError
from orchestrator.files.digest import tensor_digest
from orchestrator.workloads._baseline import cached_baseline, progress, recipe_hash, recipe_trainer
from orchestrator.workloads._workload import Workload
from orchestrator.workloads.data import Split
from techniques.tools.inputs import Inputs

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
RECIPE: dict[str, Any] = {"arch": "resnet18-cifar", "epochs": 30, "lr": 2e-3, "batch_size": 128, "seed": 0}

CLASSES = 10
PIXELS_PER_IMAGE = 3 * 32 * 32


def _empty_bytes() -> bytes:
    """Stands in for `bytes` in a pickle: it takes no arguments, so it can only ever build b""."""
    return b""


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes; it only encodes text
}
# Protocol-2 pickles spell an EMPTY bytes object (the pixel buffer of an array with no images) as
# `__builtin__.bytes()` (`builtins.bytes` once fix_imports maps it). The real `bytes` is not handed
# out: bytes(n) would let a tiny file allocate n zeroed bytes. `_empty_bytes` takes no arguments, so
# these globals can only produce b"", and they run no code.
_SUBSTITUTE_GLOBALS = {("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except what numpy arrays need."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in _SUBSTITUTE_GLOBALS:
            return _SUBSTITUTE_GLOBALS[module, name]
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N×3×32×32 uint8 images, N labels) from one CIFAR-10 python batch file."""
    try:
        with path.open("rb") as handle:
            batch = _ArraysOnlyUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"CIFAR-10 batch {path} is missing") from None
    except Exception as exc:
        raise UserError(f"CIFAR-10 batch {path} is malformed: {_first_line(exc)}") from None
    return _check_batch(batch, path)


def _check_batch(batch: object, path: Path) -> tuple[np.ndarray, np.ndarray]:
    def malformed(problem: str) -> UserError:
        return UserError(f"CIFAR-10 batch {path} is malformed: {problem}")

    if not isinstance(batch, dict):
        raise malformed(f"expected a dict of b'data' and b'labels', found {type(batch).__name__}")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise malformed(f"it has no {key!r} entry")
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except Exception as exc:  # ragged nested lists and the like
        raise malformed(f"b'data' and b'labels' must be arrays or flat lists: {_first_line(exc)}") from None

    if data.size == 0:
        raise UserError(f"CIFAR-10 batch {path} holds no images")
    if data.dtype.kind not in "ui":
        raise malformed(f"pixel data must be uint8 (0-255), got {data.dtype}")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise malformed(f"pixel values must be 0-255, found values from {data.min()} to {data.max()}")
    if data.size % PIXELS_PER_IMAGE:
        raise malformed(
            f"pixel data holds {data.size} values, not a multiple of 3*32*32 = {PIXELS_PER_IMAGE} (one image)"
        )
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32)

    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise malformed(f"labels must be a flat list of integers, got {labels.dtype} with shape {labels.shape}")
    out_of_range = np.unique(labels[(labels < 0) | (labels >= CLASSES)])
    if out_of_range.size:
        found = ", ".join(str(v) for v in out_of_range[:5]) + (", ..." if out_of_range.size > 5 else "")
        raise malformed(f"labels must be 0-{CLASSES - 1}, found {found}")
    if len(images) != len(labels):
        raise malformed(f"{len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def load_splits(data_dir: str | Path, seed: int = 0) -> dict[str, Split]:
    """Train = data_batch_1..5 less a seeded 10% validation hold-out; test = test_batch."""
    root = Path(data_dir)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise UserError(f"CIFAR-10 data directory {root} {problem}")
    progress(f"loading CIFAR-10 batches from {root}")
    parts = [read_batch(root / name) for name in TRAIN_FILES]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    test_x, test_y = read_batch(root / TEST_FILE)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, len(y) // 10)
    val, train = order[:n_val], order[n_val:]
    train_split = Split(x[train], y[train])
    return {
        "train": train_split,
        "calibration": train_split.subset(512),
        "validation": Split(x[val], y[val]),
        "test": Split(torch.from_numpy(test_x), torch.from_numpy(test_y)),
    }


def prepare(images: Inputs) -> torch.Tensor:
    """uint8 images → normalised float tensors (this workload's inputs are one tensor of images)."""
    return (cast(torch.Tensor, images).float() / 255.0 - MEAN) / STD


def resnet18_cifar(classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a 3×3 stride-1 stem and no max-pool, as usual for 32×32 inputs."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def mobilenet_student(width: float, classes: int = 10) -> nn.Module:
    """A lighter student for distillation: torchvision's MobileNetV2 at a width multiplier."""
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(num_classes=classes, width_mult=width)


def make_cifar10(data_dir: str | Path, *, weights: str | Path | None = None, epochs: int | None = None) -> Workload:
    """The cifar10 workload; baseline from `weights` (a local safetensors file) or trained and cached."""
    splits = load_splits(data_dir)
    recipe = {**RECIPE, "epochs": epochs or RECIPE["epochs"]}
    images = cast(torch.Tensor, splits["train"].inputs)  # `load_splits` stores the images as one tensor
    recipe["data"] = tensor_digest(images[:4096], splits["train"].targets)
    build = resnet18_cifar
    if weights is not None:
        if not Path(weights).is_file():
            raise UserError(f"baseline weights {weights} do not exist")
        load = functools.partial(_load_weights_file, Path(weights), build)
        recipe["weights"] = tensor_digest(torch.frombuffer(bytearray(Path(weights).read_bytes()), dtype=torch.uint8))
    else:
        train = recipe_trainer(recipe, splits["train"], "cifar10", prepare=prepare)
        load = functools.partial(cached_baseline, "cifar10", recipe, build, train)
    return Workload(
        name="cifar10",
        build_model=build,
        load_baseline=load,
        splits=splits,
        fingerprint=f"cifar10-{recipe_hash(recipe)}",
        batch_size=128,
        prepare_fn=prepare,
        build_student=mobilenet_student,
        info={"recipe": recipe, "data_dir": str(data_dir)},
    )


def _load_weights_file(path: Path, build) -> nn.Module:  # noqa: ANN001
    model = build()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:
        raise UserError(f"baseline weights {path} do not fit {model.__class__.__name__}: {exc}") from None
    return model.eval()

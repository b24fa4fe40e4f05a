"""Model weights as safetensors files: the artifact whose bytes on disk are the model's size."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent state as contiguous CPU tensors; tensors that share storage are copied."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen or not tensor.is_contiguous():
            tensor = tensor.clone().contiguous()
        seen.add(key)
        out[name] = tensor
    return out


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Write the weights atomically (temporary file, then rename); return the file's bytes on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(state_tensors(model), tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an artifact is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle)."""
    return load_file(str(path))

"""Short sha256 digests that identify data and models by their bytes (cache keys, fingerprints); any dtype,
bfloat16 included (numpy has none: bytes are read through a uint8 view), on any device."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's elements as raw bytes, in row-major order."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Identifies tensors' values (a data set in a baseline's recipe)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """Identifies a model: its class, state names, shapes, dtypes and values."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()[:16]

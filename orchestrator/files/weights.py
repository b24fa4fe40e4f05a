"""Model weights as safetensors files: the artifact whose bytes on disk are the model's size.

Decisions: `tensor_shapes` reads a file's header (8 bytes of length, then JSON naming each tensor's dtype,
shape and byte range) without touching the data, and checks every shape against the bytes it claims, so a
loader can compare what a structure record would allocate with what the file really holds before allocating.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from orchestrator.errors import UserError
from orchestrator.files.jsondoc import parse_json

# bytes per element of each safetensors dtype
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


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


class WeightsError(UserError):
    """A weights file whose header is malformed or claims bytes the file does not hold."""


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_shape(name: str, entry: object, data_bytes: int) -> tuple[int, ...]:
    """The shape of one header entry, checked against its dtype and the byte range it claims."""
    if not isinstance(entry, dict) or entry.get("dtype") not in ITEM_BYTES:
        raise WeightsError(f"weights header: tensor {name!r} has no known dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise WeightsError(f"weights header: tensor {name!r} has a malformed shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise WeightsError(f"weights header: tensor {name!r} has malformed data_offsets")
    begin, end = offsets
    if not begin <= end <= data_bytes or end - begin != math.prod(shape) * ITEM_BYTES[entry["dtype"]]:
        raise WeightsError(f"weights header: tensor {name!r} of shape {shape} claims bytes the file does not hold")
    return tuple(shape)


def tensor_shapes(data: bytes) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the safetensors file `data`, from its header alone (WeightsError if malformed)."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 <= size <= len(data) - 8:
        raise WeightsError("weights file is not safetensors (its header length does not fit the file)")
    header = parse_json(data[8 : 8 + size], "weights header", error=WeightsError)
    if not isinstance(header, dict):
        raise WeightsError("weights header is not a JSON object")
    data_bytes = len(data) - 8 - size
    return {name: _entry_shape(name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"}

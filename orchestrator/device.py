"""Choosing the device work runs on."""

from __future__ import annotations

import torch

from orchestrator.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" is CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this machine has no CUDA device")
    return device

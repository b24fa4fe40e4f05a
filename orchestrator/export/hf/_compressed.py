"""Low-bit Linear weights kept packed in compressed-tensors' `pack-quantized` format (llm-compressor's checkpoint
format), which `transformers` loads when the compressed-tensors package is installed.

Decisions:
- Opt-in (`compressed_tensors=True`, `--compressed-tensors`): a plain float directory loads everywhere, this one only
  where compressed-tensors is installed, so the same command never writes a different artifact depending on what
  happens to be installed. The package is needed here too: its own `pack_to_int32` packs the codes, so the bits
  are laid out as the installed loader reads them (version recorded in the report).
- Each PackedLinear with 2-8-bit weights whose place in the architecture is an nn.Linear is written as its module's
  `weight_packed` (int32), `weight_scale` (out, groups) and `weight_shape`: our symmetric codes (+-(2^(b-1)-1), inside
  compressed-tensors' [-2^(b-1), 2^(b-1)-1]) and scales as they are, so decoding gives the checkpoint's weights
  bitwise. One config group per (bits, group size) targets its layers by exact name (`re:^name$`); strategy "group"
  with the group size, or "channel" for per-channel scales.
- Left in float (and listed as dequantized): embeddings (transformers' loader cannot initialise a packed
  Embedding), smoothed layers (their scales fold into the weight's columns), low-rank factors (multiplied out),
  GPT-2 Conv1D places, 16/32-bit layers, and a tied output head (its tensor is the embedding's).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from orchestrator.errors import UserError
from techniques.packed.layers import FLOAT_BITS, PackedLinear

FORMAT = "pack-quantized"


def require_package() -> str:
    """The installed compressed-tensors version; UserError when it is not installed."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise UserError("--compressed-tensors needs the compressed-tensors package here (it packs the weights, and "
                        "transformers needs it to load them): pip install compressed-tensors")  # fmt: skip
    from importlib.metadata import version

    return version("compressed-tensors")


def packable(model: nn.Module, target: nn.Module, tied: bool) -> dict[str, PackedLinear]:
    """The packed layers of `model` that go into the directory packed (see the module docstring)."""
    head = "lm_head" if tied else None
    places = dict(target.named_modules())  # a low-rank factor has no place of its own: multiplied out, float
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, PackedLinear) or module.bits in FLOAT_BITS or module.smoothed or name == head:
            continue
        if module.act_bits is None and type(places.get(name)) is nn.Linear:
            found[name] = module
    return found


def _scheme(bits: int, group_size: int | None, names: list[str]) -> dict[str, Any]:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if group_size else "channel", "group_size": group_size}  # fmt: skip
    return {"targets": [f"re:^{name}$" for name in names], "weights": weights,
            "input_activations": None, "output_activations": None}  # fmt: skip


def pack(state: dict[str, torch.Tensor], layers: dict[str, PackedLinear]) -> dict[str, Any]:
    """Replace each layer's `weight` in `state` (in place) by its packed tensors; the config's quantization_config."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    groups: dict[tuple[int, int | None], list[str]] = {}
    for name, module in layers.items():
        del state[f"{name}.weight"]
        codes = module.decode_codes().to(torch.int8)
        state[f"{name}.weight_packed"] = pack_to_int32(codes, module.bits)
        state[f"{name}.weight_scale"] = module.scale.detach().clone()
        state[f"{name}.weight_shape"] = torch.tensor(list(module.weight_shape))
        groups.setdefault((module.bits, module.group_size), []).append(name)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or 0))
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": _scheme(bits, size, names) for i, ((bits, size), names) in enumerate(ordered)},
        "ignore": [],
    }

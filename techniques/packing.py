"""Pure, vectorised bit packing: b-bit signed codes and 1-bit masks stored densely in uint8 tensors.

Layout: elements are laid out one after another, each as `bits` bits least-significant bit first, and the
resulting bit stream fills bytes least-significant bit first. n elements of b bits take exactly
ceil(n*b/8) bytes. Signed codes are stored in two's complement (b bits hold [-(2^(b-1)-1), 2^(b-1)-1]).
Work is done in chunks of whole bytes so the temporary bit matrix stays bounded on large layers.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 20  # elements per chunk; a multiple of 8, so every chunk ends on a byte boundary


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed to pack `n` elements of `bits` bits each."""
    return (n * bits + 7) // 8


def code_range(bits: int) -> int:
    """The largest code magnitude of symmetric signed `bits`-bit quantisation: 2^(bits-1) - 1."""
    return (1 << (bits - 1)) - 1


def _check_bits(bits: int, low: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= 16:
        raise ValueError(f"bits must be an integer in [{low}, 16], got {bits!r}")


def _pack_unsigned(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below 2^bits (a flat int32 tensor) into uint8."""
    shifts = torch.arange(bits, dtype=torch.int32, device=values.device)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=values.device)
    out = []
    for start in range(0, values.numel(), _CHUNK):
        chunk = values[start : start + _CHUNK]
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).flatten()
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.view(-1, 8) * weights).sum(dim=1).to(torch.uint8))
    if not out:
        return torch.zeros(0, dtype=torch.uint8, device=values.device)
    return torch.cat(out)


def _unpack_unsigned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `_pack_unsigned`: the first `n` fields of `bits` bits as a flat int32 tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed data must be a 1-d uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{n} fields of {bits} bits need {packed_nbytes(n, bits)} bytes, got {packed.numel()}")
    byte_shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int32, device=packed.device)
    chunk_bytes = _CHUNK * bits // 8
    out = []
    for start in range(0, packed.numel(), chunk_bytes):
        chunk = packed[start : start + chunk_bytes].to(torch.int32)
        stream = ((chunk.unsqueeze(1) >> byte_shifts) & 1).flatten()
        count = min(_CHUNK, n - start * 8 // bits)
        out.append((stream[: count * bits].view(count, bits) * weights).sum(dim=1))
    if not out:
        return torch.zeros(0, dtype=torch.int32, device=packed.device)
    return torch.cat(out)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes in [-(2^(bits-1)-1), 2^(bits-1)-1] into ceil(n*bits/8) uint8 bytes."""
    _check_bits(bits, 2)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int32)
    limit = code_range(bits)
    low, high = (int(flat.min()), int(flat.max())) if flat.numel() else (0, 0)
    if low < -limit or high > limit:
        raise ValueError(f"{bits}-bit codes must lie in [{-limit}, {limit}], got [{low}, {high}]")
    return _pack_unsigned(flat & ((1 << bits) - 1), bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The `n` signed codes `pack_bits` stored: int8 for bits <= 8, int16 above."""
    _check_bits(bits, 2)
    fields = _unpack_unsigned(packed, bits, n)
    signed = fields - ((fields >> (bits - 1)) << bits)
    return signed.to(torch.int8 if bits <= 8 else torch.int16)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor at one bit per element (ceil(n/8) bytes)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    return _pack_unsigned(mask.reshape(-1).to(torch.int32), 1)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The flat boolean mask of `n` elements that `pack_mask` stored."""
    return _unpack_unsigned(packed, 1, n).to(torch.bool)

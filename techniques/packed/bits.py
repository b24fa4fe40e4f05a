"""Pure, vectorised bit packing: b-bit signed codes and 1-bit masks stored densely in uint8 tensors.

Layout: elements are laid out one after another, each as `bits` bits least-significant bit first, and the
resulting bit stream fills bytes least-significant bit first. n elements of b bits take exactly
ceil(n*b/8) bytes. Signed codes are stored in two's complement (b bits hold [-(2^(b-1)-1), 2^(b-1)-1]).
Work is done in chunks of whole bytes so the temporary bit matrix stays bounded on large layers.
`pack_rows` lays out each row of a matrix this way on its own, starting on a byte boundary, so one row can
be read without its neighbours (an embedding lookup decodes only the rows it gathers, `unpack_rows`).
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


def _fields(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes checked against the `bits`-bit range, as their two's-complement bit fields (int32)."""
    _check_bits(bits, 2)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    values = codes.to(torch.int32)
    limit = code_range(bits)
    low, high = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
    if low < -limit or high > limit:
        raise ValueError(f"{bits}-bit codes must lie in [{-limit}, {limit}], got [{low}, {high}]")
    return values & ((1 << bits) - 1)


def _signed(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's-complement `bits`-bit fields (int32) as signed codes: int8 for bits <= 8, int16 above."""
    signed = fields - ((fields >> (bits - 1)) << bits)
    return signed.to(torch.int8 if bits <= 8 else torch.int16)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes in [-(2^(bits-1)-1), 2^(bits-1)-1] into ceil(n*bits/8) uint8 bytes."""
    return _pack_unsigned(_fields(codes, bits).reshape(-1), bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The `n` signed codes `pack_bits` stored: int8 for bits <= 8, int16 above."""
    _check_bits(bits, 2)
    return _signed(_unpack_unsigned(packed, bits, n), bits)


def split_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed codes of uint8 bytes each holding 8 // bits whole codes (low bits first), flattened along the
    last dim; shifts and masks only, so the work is the output's and no Python int comes from the shape."""
    if bits == 8:
        return packed.view(torch.int8)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    fields = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    return fields - ((fields >> (bits - 1)) << bits)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a (rows, cols) matrix of signed codes row by row: a (rows, ceil(cols*bits/8)) uint8 matrix whose
    row i holds `pack_bits(codes[i], bits)`, so every row starts on a byte boundary."""
    fields = _fields(codes, bits)
    if fields.dim() != 2:
        raise ValueError(f"codes must be a matrix, got shape {tuple(codes.shape)}")
    rows, cols = fields.shape
    width = packed_nbytes(cols, bits)
    shifts = torch.arange(bits, dtype=torch.int32, device=codes.device)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=codes.device)
    out = [torch.zeros(0, width, dtype=torch.uint8, device=codes.device)]
    step = max(1, _CHUNK // max(1, cols * bits))  # rows per chunk: a bounded bit matrix
    for start in range(0, rows, step):
        chunk = fields[start : start + step]
        stream = ((chunk.unsqueeze(2) >> shifts) & 1).reshape(chunk.shape[0], cols * bits)
        stream = torch.nn.functional.pad(stream, (0, width * 8 - cols * bits))
        out.append((stream.view(-1, width, 8) * weights).sum(dim=2).to(torch.uint8))
    return torch.cat(out)


def _byte_codes(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 // bits) int8: the signed codes each byte value holds, for widths that divide 8."""
    fields = (
        torch.arange(256, dtype=torch.int32, device=device).unsqueeze(1) >> torch.arange(0, 8, bits, device=device)
    ) & ((1 << bits) - 1)
    return _signed(fields, bits)


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The (rows, cols) signed codes `pack_rows` stored, from any subset of its rows: a contiguous int8 matrix
    (int16 above 8 bits).

    The work and memory are those of the output: 8-bit rows are reinterpreted, 2- and 4-bit rows look each byte
    up in a 256-entry table, other widths read each code from the bytes it spans (columns gathered as rows of
    the transposed matrix, which copies contiguous runs).
    """
    _check_bits(bits, 2)
    width = packed_nbytes(cols, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != width:
        shape = tuple(packed.shape)
        raise ValueError(f"rows of {cols} {bits}-bit codes need a (rows, {width}) uint8 matrix, got {shape}")
    if bits == 8:
        return packed.view(torch.int8).clone()
    if 8 % bits == 0:
        codes = _byte_codes(bits, packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
        return codes.view(len(packed), width * 8 // bits)[:, :cols].contiguous()
    start = torch.arange(cols, device=packed.device) * bits
    first, offset = start // 8, (start % 8).unsqueeze(1)
    span = (7 + bits + 7) // 8  # bytes one code can touch
    dtype = torch.int16 if bits <= 8 else torch.int32
    columns = torch.nn.functional.pad(packed, (0, span - 1)).t().to(dtype)  # (bytes, rows)
    word = columns.index_select(0, first)
    for k in range(1, span):
        word = word | (columns.index_select(0, first + k) << (8 * k))
    high = 16 if dtype == torch.int16 else 32
    signed = ((word >> offset.to(dtype)) << (high - bits)) >> (high - bits)  # arithmetic shift: sign extension
    return signed.to(torch.int8 if bits <= 8 else torch.int16).t().contiguous()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor at one bit per element (ceil(n/8) bytes)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    return _pack_unsigned(mask.reshape(-1).to(torch.int32), 1)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The flat boolean mask of `n` elements that `pack_mask` stored."""
    return _unpack_unsigned(packed, 1, n).to(torch.bool)


_BYTE_POPCOUNT = [bin(value).count("1") for value in range(256)]


def popcount(packed: torch.Tensor) -> int:
    """How many bits are set in a uint8 tensor (a packed mask's kept elements, padding bits included)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be a uint8 tensor, got {packed.dtype}")
    table = torch.tensor(_BYTE_POPCOUNT, dtype=torch.int64, device=packed.device)
    return int(table.index_select(0, packed.reshape(-1).to(torch.int64)).sum())

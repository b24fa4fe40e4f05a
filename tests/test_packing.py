"""Bit packing: exact round trips for every width, exact byte counts, rejection of out-of-range codes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from techniques.packed.bits import (
    code_range,
    pack_bits,
    pack_mask,
    pack_rows,
    packed_nbytes,
    unpack_bits,
    unpack_mask,
    unpack_rows,
)

WIDTHS = [2, 3, 4, 5, 6, 7, 8, 12, 16]


@st.composite
def codes_of_width(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    bits = draw(st.sampled_from(WIDTHS))
    limit = code_range(bits)
    values = draw(st.lists(st.integers(-limit, limit), max_size=200))
    return torch.tensor(values, dtype=torch.int32), bits


@settings(max_examples=150, deadline=None)
@given(codes_of_width())
def test_codes_round_trip_in_exact_bytes(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(codes.numel(), bits) == -(-codes.numel() * bits // 8)
    out = unpack_bits(packed, bits, codes.numel())
    assert out.dtype == (torch.int8 if bits <= 8 else torch.int16) and out.is_contiguous()
    assert torch.equal(out.to(torch.int32), codes)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_mask_round_trips_at_one_bit_per_element(values: list[bool]) -> None:
    mask = torch.tensor(values, dtype=torch.bool)
    packed = pack_mask(mask)
    assert packed.numel() == -(-len(values) // 8)
    assert torch.equal(unpack_mask(packed, len(values)), mask)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_extreme_codes_of_every_quantisation_width(bits: int) -> None:
    limit = code_range(bits)
    codes = torch.tensor([-limit, limit, 0, -1, 1] * 7, dtype=torch.int8).reshape(5, 7)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, codes.numel()).view(5, 7), codes)


def test_large_tensor_crosses_chunk_boundaries() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-3, 4, ((1 << 20) + 13,), generator=gen)
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, codes.numel()).long(), codes)
    mask = codes > 0
    assert torch.equal(unpack_mask(pack_mask(mask), mask.numel()), mask)


@st.composite
def matrix_of_width(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    bits = draw(st.sampled_from(WIDTHS))
    rows, cols = draw(st.integers(0, 9)), draw(st.integers(1, 40))
    limit = code_range(bits)
    values = draw(st.lists(st.integers(-limit, limit), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.int32).view(rows, cols), bits


@settings(max_examples=150, deadline=None)
@given(matrix_of_width(), st.data())
def test_rows_pack_like_pack_bits_one_by_one_and_unpack_from_any_subset(
    case: tuple[torch.Tensor, int], data: st.DataObject
) -> None:
    codes, bits = case
    rows, cols = codes.shape
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_nbytes(cols, bits))
    for row in range(rows):
        assert torch.equal(packed[row], pack_bits(codes[row], bits))
    assert torch.equal(unpack_rows(packed, bits, cols).to(torch.int32), codes)
    picks = data.draw(st.lists(st.integers(0, rows - 1), max_size=12)) if rows else []
    index = torch.tensor(picks, dtype=torch.long)
    out = unpack_rows(packed[index], bits, cols)
    assert out.dtype == (torch.int8 if bits <= 8 else torch.int16) and out.is_contiguous()
    assert torch.equal(out.to(torch.int32), codes[index])


def test_large_row_matrix_packs_in_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-15, 16, (5000, 300), generator=gen)
    assert torch.equal(unpack_rows(pack_rows(codes, 5), 5, 300).long(), codes)


def test_row_packing_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="matrix"):
        pack_rows(torch.tensor([1, 2]), 4)
    with pytest.raises(ValueError, match="must lie in"):
        pack_rows(torch.tensor([[8]]), 4)
    with pytest.raises(ValueError, match=r"\(rows, 2\) uint8"):
        unpack_rows(torch.zeros(3, 3, dtype=torch.uint8), 4, 4)


def test_known_layout_is_lsb_first() -> None:
    # 4-bit codes 1 and -1 (two's complement 0b1111) share one byte: low nibble first.
    assert pack_bits(torch.tensor([1, -1]), 4).tolist() == [0xF1]
    assert pack_mask(torch.tensor([True, False, False, False, False, False, False, False, True])).tolist() == [1, 1]


@pytest.mark.parametrize(
    ("codes", "bits"),
    [(torch.tensor([2]), 2), (torch.tensor([-2]), 2), (torch.tensor([8]), 4), (torch.tensor([-128]), 8)],
)
def test_out_of_range_codes_are_rejected(codes: torch.Tensor, bits: int) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(codes, bits)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)
    with pytest.raises(ValueError, match="bool"):
        pack_mask(torch.tensor([1, 0]))

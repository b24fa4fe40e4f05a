"""PackedEmbedding: an embedding table stored as b-bit rows, of which a lookup decodes only the rows it gathers.

Decisions:
- The table is b-bit codes (2-8 bits; float16 at bits=16) with the symmetric scales of `techniques.packed.layers`, one
  per row (or per group of a row): an embedding row is quantised as a Linear's output row is. Rows are packed
  separately (`pack_rows`), so a lookup gathers the packed bytes and scales of the ids it is given and decodes
  only those rows, never the whole table (no decode cache either: a vocabulary-sized float32 copy would undo
  the saving in memory). `padding_idx` is kept (its row decodes to what was stored, zero for an untouched
  padding row); `max_norm` is refused by quantization, and `sparse`/`scale_grad_by_freq` only shape
  gradients, which a packed table has none of.
- Export hooks (`decode_rows`, `export_forward`) redo the lookup with tensor operations only, as
  `techniques.packed.layers` does for its layers.
"""

from __future__ import annotations

from typing import Any

import torch

from techniques._base import RebuildableModule, rebuildable
from techniques.packed.bits import pack_rows, packed_nbytes, split_bytes, unpack_rows
from techniques.packed.layers import dequantize, weight_codes

GATHER_KERNEL = "gathered-rows-dequantized-fp32"  # a packed embedding decodes the rows each lookup gathers
EMBEDDING_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


def _check_count(what: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")


@rebuildable
class PackedEmbedding(RebuildableModule):
    """An Embedding with b-bit packed rows and per-row (or per-group) scales; a lookup decodes only its rows."""

    values: torch.Tensor  # (num_embeddings, ceil(dim*bits/8)) uint8 codes, or (num_embeddings, dim) float16
    scale: torch.Tensor  # (num_embeddings, groups) float32; absent at bits=16

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bits: int,
        group_size: int | None = None,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        _check_count("num_embeddings", num_embeddings, 1)
        _check_count("embedding_dim", embedding_dim, 1)
        if isinstance(bits, bool) or bits not in EMBEDDING_BITS:
            raise ValueError(f"bits must be one of {EMBEDDING_BITS}, got {bits!r}")
        if group_size is not None:
            _check_count("group_size", group_size, 1)
            if embedding_dim % group_size:
                raise ValueError(f"group_size {group_size} does not divide embedding_dim {embedding_dim}")
        if padding_idx is not None:
            _check_count("padding_idx", padding_idx, 0)
            if padding_idx >= num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} is not a row of a {num_embeddings}-row table")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.padding_idx = bits, group_size, padding_idx
        if bits == 16:
            self.register_buffer("values", torch.zeros(num_embeddings, embedding_dim, dtype=torch.float16))
        else:
            width = packed_nbytes(embedding_dim, bits)
            self.register_buffer("values", torch.zeros(num_embeddings, width, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(num_embeddings, embedding_dim // (group_size or embedding_dim)))

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, *, bits: int, group_size: int | None = None, padding_idx: int | None = None
    ) -> PackedEmbedding:
        """Quantise and pack a (num_embeddings, embedding_dim) float table."""
        num, dim = weight.shape
        module = cls(num, dim, bits=bits, group_size=group_size, padding_idx=padding_idx)
        with torch.no_grad():
            weight = weight.detach().float()
            if bits == 16:
                module.values.copy_(weight.half())
            else:
                codes, scale = weight_codes(weight, bits, group_size)
                module.scale.copy_(scale.squeeze(2))
                module.values.copy_(pack_rows(codes.reshape(num, dim).to(torch.int32), bits))
        return module.to(weight.device)

    def rebuild_config(self) -> dict[str, Any]:
        """JSON-safe arguments that rebuild an empty module with this one's state_dict keys and shapes."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "group_size": self.group_size,
            "padding_idx": self.padding_idx,
        }

    def decode_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 rows at the flat index tensor `ids`, decoded from their packed bytes and scales alone.

        `index_select` rejects negative and out-of-range ids (IndexError), as nn.Embedding does.
        """
        rows = self.values.index_select(0, ids)
        if self.bits == 16:
            return rows.float()
        codes = unpack_rows(rows, self.bits, self.embedding_dim).float()
        scale = self.scale.index_select(0, ids)
        return dequantize(codes.view(len(ids), scale.shape[1], -1), scale.unsqueeze(2), (len(ids), self.embedding_dim))

    def dense_weight(self) -> torch.Tensor:
        """The whole decoded float32 table (for counting and inspection; forward never builds it)."""
        return self.decode_rows(torch.arange(self.num_embeddings, device=self.values.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"embedding ids must be an int32 or int64 tensor, got {ids.dtype}")
        return self.decode_rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    def export_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """`forward` for torch.export: the same rows, decoded without Python ints taken from the ids' shape (which
        would fix an exported program's batch size); bytes holding whole codes (2, 4, 8 bits) split with shifts."""
        flat = ids.reshape(-1)
        rows = self.values.index_select(0, flat)
        if self.bits == 16:
            return rows.float().reshape(*ids.shape, self.embedding_dim)
        if 8 % self.bits == 0:
            codes = split_bytes(rows, self.bits)[:, : self.embedding_dim]
        else:
            codes = unpack_rows(rows, self.bits, self.embedding_dim)
        groups = self.scale.shape[1]
        scale = self.scale.index_select(0, flat).unsqueeze(2)
        decoded = codes.float().view(-1, groups, self.embedding_dim // groups) * scale
        return decoded.reshape(*ids.shape, self.embedding_dim)

    @property
    def kernel_reason(self) -> str:
        """Why no integer kernel runs: a lookup has no GEMM; it gathers packed rows and decodes them to float32."""
        return "an embedding lookup has no integer kernel: it gathers packed rows and decodes only those to float32"

    @property
    def kernel(self) -> str:
        return GATHER_KERNEL

"""How a parameter block's flat gradient maps to a matrix.

The featurizer's flat layout of a block is its parameters in registration order, each
flattened as stored (``weight`` row-major, then ``bias``). Curvature and factorized sketches
work on a matrix view of the same numbers:

* :class:`KronLayout` — a Kronecker-structured block: the weight viewed as ``[rows, cols]``
  (Linear ``[d_out, d_in]``, Conv ``[C_out, C_in·k…]``, transformers' Conv1D ``[d_in, d_out]``,
  Embedding ``[vocab, dim]``), the bias (if in the block) appended as an extra column
  (``bias="col"``: Linear, Conv) or an extra row (``bias="row"``: Conv1D, whose weight is stored
  transposed). Matrix shape ``[rows(+1), cols(+1)]``.
* :class:`FlatLayout` — any other block (norm weights, a lone bias): the matrix is ``[1, d]``.

Both convert ``[B, dim]`` <-> ``[B, *shape]`` exactly (:meth:`to_flat`, :meth:`from_flat`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BlockLayout", "FlatLayout", "KronLayout"]


@dataclass(frozen=True)
class KronLayout:
    """Weight ``[rows, cols]`` with the bias as an extra column (``"col"``), row (``"row"``) or absent (None)."""

    rows: int
    cols: int
    bias: str | None = None

    def __post_init__(self) -> None:
        if self.bias not in (None, "col", "row"):
            raise ValueError(f"bias must be None, 'col' or 'row', got {self.bias!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """Matrix shape ``(rows(+1), cols(+1))``."""
        return self.rows + (self.bias == "row"), self.cols + (self.bias == "col")

    @property
    def dim(self) -> int:
        r, c = self.shape
        return r * c

    @property
    def kronecker(self) -> bool:
        return True

    def to_flat(self, mat: torch.Tensor) -> torch.Tensor:
        """``[B, rows(+1), cols(+1)]`` -> ``[B, dim]`` (weight row-major, then bias)."""
        b = mat.shape[0]
        if self.bias == "col":
            return torch.cat([mat[:, :, : self.cols].reshape(b, -1), mat[:, :, self.cols]], dim=1)
        return mat.reshape(b, -1)  # bias row: [W; bᵀ] row-major is weight then bias already

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """``[B, dim]`` -> ``[B, rows(+1), cols(+1)]`` (inverse of :meth:`to_flat`)."""
        b = flat.shape[0]
        if self.bias == "col":
            nw = self.rows * self.cols
            weight = flat[:, :nw].reshape(b, self.rows, self.cols)
            return torch.cat([weight, flat[:, nw:, None]], dim=2)
        return flat.reshape(b, *self.shape)

    def describe(self) -> list[Any]:
        """JSON-able form (metadata)."""
        return ["kron", self.rows, self.cols, self.bias]


@dataclass(frozen=True)
class FlatLayout:
    """A block without Kronecker structure: matrix ``[1, dim]``."""

    size: int

    @property
    def shape(self) -> tuple[int, int]:
        return 1, self.size

    @property
    def dim(self) -> int:
        return self.size

    @property
    def kronecker(self) -> bool:
        return False

    def to_flat(self, mat: torch.Tensor) -> torch.Tensor:
        return mat.reshape(mat.shape[0], -1)

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(flat.shape[0], 1, -1)

    def describe(self) -> list[Any]:
        return ["flat", self.size]


BlockLayout = KronLayout | FlatLayout


def layout_from(desc: list[Any]) -> BlockLayout:
    """Inverse of ``describe()``."""
    if desc[0] == "kron":
        return KronLayout(int(desc[1]), int(desc[2]), desc[3])
    if desc[0] == "flat":
        return FlatLayout(int(desc[1]))
    raise ValueError(f"unknown layout description {desc!r}")

"""Kronecker factors of a per-example gradient: ``G_i = Σ_t row_t col_tᵀ``.

A layer rule that sees Kronecker structure (Linear, Conv, transformers' Conv1D, Embedding)
hands the hook engine two factors per call of its module, each ``[B, T, width]`` (T =
positions: sequence tokens, output pixels, or 1). Their contraction over t is the exact
per-example gradient of the weight as it is stored (bias as an extra column or row, see
:class:`~sketchattr.core.layout.KronLayout`).

Two kinds:

* :class:`DenseFactor` — a tensor ``[B, T, d]`` (layer inputs, output gradients, patches).
* :class:`OneHotFactor` — ``e_{idx[b, t]}`` of width ``d`` times an optional per-position
  weight (token ids of an Embedding): never materialised, so a 50k-token vocabulary costs
  ``[B, T]`` integers, not ``[B, T, 50k]`` floats.

Every consumer (exact gradients, factorized sketches, curvature statistics) goes through the
methods here, so both kinds work everywhere.
"""
from __future__ import annotations

import abc

import torch

__all__ = ["Factor", "DenseFactor", "OneHotFactor", "outer_sum"]


class Factor(abc.ABC):
    """One side of a Kronecker-structured per-example gradient, ``[B, T, width]``."""

    @property
    @abc.abstractmethod
    def batch(self) -> int:
        """B."""

    @property
    @abc.abstractmethod
    def positions(self) -> int:
        """T."""

    @property
    @abc.abstractmethod
    def width(self) -> int:
        """d (the factor's dimension)."""

    @abc.abstractmethod
    def extend(self, value: float) -> "Factor":
        """Append a constant coordinate (1: the bias of this use; 0: a bias this use lacks)."""

    @abc.abstractmethod
    def masked(self, mask: torch.Tensor) -> "Factor":
        """Zero the positions where ``mask [B, T]`` is 0."""

    @abc.abstractmethod
    def grouped(self, group: int) -> "Factor":
        """``[B·group, T, d]`` -> ``[B, group·T, d]``: consecutive rows of one example (C choices run as
        C rows of the batch) become that example's positions."""

    @abc.abstractmethod
    def project(self, p: torch.Tensor) -> torch.Tensor:
        """``factor @ pᵀ``: ``p [m, width]`` -> ``[B, T, m]``."""

    @abc.abstractmethod
    def gram(self) -> torch.Tensor:
        """``Σ_b Σ_t f fᵀ``: ``[width, width]``, or its diagonal ``[width]`` when it is diagonal."""

    @abc.abstractmethod
    def to(self, dtype: torch.dtype) -> "Factor":
        """The factor in ``dtype``."""

    @abc.abstractmethod
    def cat(self, other: "Factor") -> "Factor":
        """Concatenate along positions (a module called twice in one forward)."""


class DenseFactor(Factor):
    """A dense factor ``[B, T, d]``."""

    def __init__(self, values: torch.Tensor) -> None:
        if values.dim() != 3:
            raise ValueError(f"a dense factor is [B, T, d], got shape {tuple(values.shape)}")
        self.values = values

    @property
    def batch(self) -> int:
        return self.values.shape[0]

    @property
    def positions(self) -> int:
        return self.values.shape[1]

    @property
    def width(self) -> int:
        return self.values.shape[2]

    def extend(self, value: float) -> "DenseFactor":
        v = self.values
        return DenseFactor(torch.cat([v, v.new_full((*v.shape[:2], 1), float(value))], dim=2))

    def masked(self, mask: torch.Tensor) -> "DenseFactor":
        return DenseFactor(self.values * mask.to(self.values.dtype).unsqueeze(-1))

    def grouped(self, group: int) -> "DenseFactor":
        b, t, d = self.values.shape
        return DenseFactor(self.values.reshape(b // group, group * t, d))

    def project(self, p: torch.Tensor) -> torch.Tensor:
        return self.values @ p.T

    def gram(self) -> torch.Tensor:
        flat = self.values.reshape(-1, self.width)
        return flat.T @ flat

    def to(self, dtype: torch.dtype) -> "DenseFactor":
        return DenseFactor(self.values.to(dtype))

    def cat(self, other: Factor) -> "DenseFactor":
        if not isinstance(other, DenseFactor):
            other = DenseFactor(other.dense())
        return DenseFactor(torch.cat([self.values, other.values], dim=1))

    def dense(self) -> torch.Tensor:
        return self.values


class OneHotFactor(Factor):
    """``weight[b, t] · e_{index[b, t]}`` of width ``d``: index ``[B, T]`` int64, weight ``[B, T]`` or None (1)."""

    def __init__(self, index: torch.Tensor, width: int, weight: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if index.dim() != 2:
            raise ValueError(f"a one-hot factor's index is [B, T], got shape {tuple(index.shape)}")
        self.index = index.long()
        self._width = int(width)
        self.weight = weight
        self.dtype = dtype if weight is None else weight.dtype

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    @property
    def positions(self) -> int:
        return self.index.shape[1]

    @property
    def width(self) -> int:
        return self._width

    def _weights(self) -> torch.Tensor:
        if self.weight is None:
            return torch.ones(self.index.shape, dtype=self.dtype, device=self.index.device)
        return self.weight

    def extend(self, value: float) -> "OneHotFactor":
        if value != 0:
            raise ValueError("a one-hot factor cannot carry a bias coordinate of 1")
        return OneHotFactor(self.index, self._width + 1, self.weight, self.dtype)

    def masked(self, mask: torch.Tensor) -> "OneHotFactor":
        return OneHotFactor(self.index, self._width, self._weights() * mask.to(self.dtype), self.dtype)

    def grouped(self, group: int) -> "OneHotFactor":
        b, t = self.index.shape
        weight = None if self.weight is None else self.weight.reshape(b // group, group * t)
        return OneHotFactor(self.index.reshape(b // group, group * t), self._width, weight, self.dtype)

    def project(self, p: torch.Tensor) -> torch.Tensor:
        cols = p.T.index_select(0, self.index.reshape(-1)).reshape(*self.index.shape, p.shape[0])
        return cols if self.weight is None else cols * self.weight.to(cols.dtype).unsqueeze(-1)

    def gram(self) -> torch.Tensor:
        """The diagonal ``[width]``: counts of each index (weighted by weight²)."""
        w = self._weights()
        return torch.zeros(self._width, dtype=w.dtype, device=w.device).index_add_(
            0, self.index.reshape(-1), (w * w).reshape(-1))

    def to(self, dtype: torch.dtype) -> "OneHotFactor":
        return OneHotFactor(self.index, self._width, None if self.weight is None else self.weight.to(dtype), dtype)

    def cat(self, other: Factor) -> Factor:
        if isinstance(other, OneHotFactor) and other.width == self.width:
            w = torch.cat([self._weights(), other._weights().to(self.dtype)], dim=1)
            return OneHotFactor(torch.cat([self.index, other.index], dim=1), self._width, w, self.dtype)
        return DenseFactor(self.dense()).cat(other)

    def dense(self) -> torch.Tensor:
        """``[B, T, width]`` (small widths only)."""
        out = torch.zeros(*self.index.shape, self._width, dtype=self.dtype, device=self.index.device)
        return out.scatter_(2, self.index.unsqueeze(-1), self._weights().unsqueeze(-1))


def outer_sum(row: Factor, col: Factor) -> torch.Tensor:
    """Exact per-example gradient matrices ``Σ_t row_t col_tᵀ``: ``[B, R, C]``."""
    if not isinstance(col, DenseFactor):
        if isinstance(row, DenseFactor):
            return outer_sum(col, row).transpose(1, 2)
        col = DenseFactor(col.dense())
    if isinstance(row, DenseFactor):
        return torch.einsum("btr,btc->brc", row.values, col.values)
    # one-hot rows: scatter-add each position's column vector into row idx of its example
    b, t, c = col.values.shape
    vals = col.values if row.weight is None else col.values * row.weight.to(col.values.dtype).unsqueeze(-1)
    flat_rows = (torch.arange(b, device=row.index.device).unsqueeze(1) * row.width + row.index).reshape(-1)
    out = torch.zeros(b * row.width, c, dtype=vals.dtype, device=vals.device)
    return out.index_add_(0, flat_rows, vals.reshape(-1, c)).reshape(b, row.width, c)

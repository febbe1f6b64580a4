"""What a projector reads of one batch's per-example gradients: the :class:`Capture` protocol.

The hook engine (:class:`sketchattr.featurize.capture.BatchCapture`) produces it; projectors only
map it to rows, so they depend on this shape, not on the engine. Per block ``k`` of the selected
modules: its exact per-example gradient ``[B, d_k]`` (whole, or in column pieces), and for
Kronecker blocks the ``(row, col)`` factors of every call (:mod:`sketchattr.core.kronecker`).
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import torch

from sketchattr.core.kronecker import Factor

__all__ = ["Capture", "CapturedBlock"]


class CapturedBlock(Protocol):
    """One selected module's parameters as the projector sees them."""

    @property
    def dim(self) -> int:
        """d_k: its number of parameters."""

    @property
    def kronecker(self) -> bool:
        """Whether its gradient is a sum of Kronecker products (then :meth:`Capture.factors` works)."""


class Capture(Protocol):
    """One batch's per-example gradients over the selected blocks (B examples)."""

    batch: int
    blocks: Sequence[CapturedBlock]

    def grads(self, k: int) -> torch.Tensor:
        """Block ``k``'s exact per-example gradient in its flat layout: ``[B, d_k]``."""

    def grad_pieces(self, k: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The same in column pieces ``(start, [B, w])`` covering ``[0, d_k)``."""

    def factors(self, k: int) -> list[tuple[Factor, Factor]]:
        """Block ``k``'s ``(row, col)`` factors per call, bias coordinates appended, padding masked."""

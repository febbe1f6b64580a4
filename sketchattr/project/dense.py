"""Dense random projectors: Gaussian and Rademacher (``P_ij`` i.i.d. with variance ``1/m``).

Generation rule (what the tests rebuild independently).  For module ``k`` with ``d_k``
columns, chunk ``b`` covers columns ``[b * W, min(d_k, (b + 1) * W))`` with
``W = chunk_cols = max(1, 2**20 // m)`` (so a chunk has at most ~2**20 entries, 4 MB in
float32) and width ``w = min(W, d_k - b * W)``.  With
``gen = torch.Generator(device="cpu").manual_seed(block_seed(seed, k, b))``, the chunk
``P_k[:, b*W : b*W + w]`` is

* Gaussian:   ``torch.randn(m, w, generator=gen, dtype=torch.float32) / math.sqrt(m)``
* Rademacher: ``(torch.randint(0, 2, (m, w), generator=gen, dtype=torch.float32) * 2 - 1)
  / math.sqrt(m)``  (same values as the int64 ``randint`` stream, cast to float32)

It is always drawn on CPU in float32 (bit-identical on every device and for every input
dtype) and then cast to the input's dtype and moved to its device.  Each chunk is applied
with one ``addmm`` per slice of at most ``block_size`` columns, so the only temporary is the
chunk itself: at most ``max(m, 2**20)`` entries, whatever ``d``.
"""
from __future__ import annotations

import abc
import math

import torch

from sketchattr.project.base import Block, ChunkedProjector

__all__ = ["DenseProjector", "GaussianProjector", "RademacherProjector"]

DENSE_CHUNK_ELEMENTS = 2**20


class DenseProjector(ChunkedProjector):
    """Dense ``m x d`` projector drawn chunk by chunk; subclasses only define the entries."""

    @property
    def chunk_cols(self) -> int:
        return max(1, DENSE_CHUNK_ELEMENTS // self.m)

    @abc.abstractmethod
    def _draw_entries(self, gen: torch.Generator, width: int) -> torch.Tensor:
        """The chunk ``[m, width]`` in float32, already scaled by ``1/sqrt(m)``."""

    def _draw_chunk(self, gen: torch.Generator, width: int) -> Block:
        return (self._draw_entries(gen, width).T,)  # columns along dim 0

    def _prepare(self, raw: Block, dtype: torch.dtype, device: torch.device) -> Block:
        return (raw[0].to(device=device, dtype=dtype),)

    def _apply(self, out: torch.Tensor, g: torch.Tensor, block: Block) -> None:
        out.addmm_(g, block[0])

    def _explicit(self, block: Block, dtype: torch.dtype) -> torch.Tensor:
        return block[0].T.to(dtype)

    def _bytes_per_column(self, dtype: torch.dtype, device: torch.device) -> int:
        return self.m * dtype.itemsize


class GaussianProjector(DenseProjector, name="gaussian"):
    """``P_ij ~ N(0, 1/m)``; see the module docstring for the exact generation rule."""

    def _draw_entries(self, gen: torch.Generator, width: int) -> torch.Tensor:
        return torch.randn(self.m, width, generator=gen, dtype=torch.float32).div_(math.sqrt(self.m))


class RademacherProjector(DenseProjector, name="rademacher"):
    """``P_ij = +-1/sqrt(m)`` with equal probability; see the module docstring."""

    def _draw_entries(self, gen: torch.Generator, width: int) -> torch.Tensor:
        bits = torch.randint(0, 2, (self.m, width), generator=gen, dtype=torch.float32)
        # In place: bits * 2r - r = +-r exactly, where r = float32(1) / sqrt(m) is the value
        # the documented rule produces ((2 * bits - 1) / sqrt(m)).
        r = (torch.ones((), dtype=torch.float32) / math.sqrt(self.m)).item()
        return bits.mul_(2 * r).sub_(r)

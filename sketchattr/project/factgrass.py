"""FactGraSS-style sketch: coordinate masks on the layer factors, Kronecker product, then SJLT.

Stage 1 (per Kronecker block ``k``, see :mod:`sketchattr.project.factorized`) is the factorized
sketch with the Gaussian factors replaced by scaled coordinate masks: ``M_in`` keeps
``m_in' = min(m_in, cols(+1))`` coordinates of the column factor and ``M_out`` keeps
``m_out' = min(m_out, rows(+1))`` of the row factor, each scaled by ``sqrt(d / m')`` so that
``E[MᵀM] = I``.  On the captured factors it costs an index-select instead of a matmul::

    z_k = Σ_t (M_out row_t) ⊗ (M_in col_t) = (M_out ⊗ M_in) vec(G_k)        # [m_out' * m_in']

A block without Kronecker structure (norms, a lone bias) keeps ``min(m_out * m_in, d)`` scaled
coordinates of its exact gradient.  Stage 2 mixes every block's ``z_k`` into one
``m``-dimensional row with an :class:`~sketchattr.project.sjlt.SJLTProjector` (block ``k`` of the
SJLT is ``z_k``), so rows are ``[B, m]`` like those of the dense projectors.

**Generation rule.**  With ``gen(k, side) = torch.Generator(device="cpu").manual_seed(
block_seed(seed, k, side))`` (side 0: rows, 1: columns, 3: a flat block), the kept coordinates are
``torch.randperm(d, generator=gen(k, side))[:m']`` (in that order).  The SJLT stage is
``SJLTProjector(m, seed=block_seed(seed, 0, 2), c=c)`` over the blocks' ``z_k``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sketchattr.core.capture import Capture
from sketchattr.project.base import DEFAULT_BLOCK_SIZE, _check_dims, _check_int, block_seed, cpu_generator
from sketchattr.project.factorized import FLAT_STREAM, FactorizedProjector, square_split
from sketchattr.project.sjlt import SJLTProjector

__all__ = ["FactGraSSProjector"]


class FactGraSSProjector(FactorizedProjector, name="factgrass"):
    """Mask → Kronecker → SJLT sketch of every block's gradient; rows ``[B, m]``.

    Args:
        m: final sketch size (rows of the store).
        m_out, m_in: mask sizes per module (capped at the layer's ``d_out`` / ``d_in(+1)``);
            default: the near-square split of ``4 * m`` (64 × 64 for m = 1024).
        seed: int >= 0. c: nonzeros per column of the SJLT stage.
    """

    def __init__(
        self, m: int, m_out: int | None = None, m_in: int | None = None, seed: int = 0, c: int = 1,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        m = _check_int("m", m, minimum=1)
        if m_out is None or m_in is None:
            m_out, m_in = square_split(4 * m)
        super().__init__(m_out, m_in, seed=seed, block_size=block_size)
        self.m = m
        self.c = _check_int("c", c, minimum=1)
        self.mixer = SJLTProjector(m, seed=block_seed(self.seed, 0, 2), c=self.c)
        self._masks: dict[tuple[int, int, int, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ stage 1: masks
    def _keep(self, side: int) -> int:
        return {0: self.m_out, 1: self.m_in, FLAT_STREAM: self.m_out * self.m_in}[side]

    def mask(self, module_index: int, side: int, d: int, device: "torch.device | str" = "cpu") -> torch.Tensor:
        """Kept coordinates (int64, ``[min(m_side, d)]``, on ``device``) of block
        ``module_index``'s column factor (``side`` 1), row factor (0) or flat gradient (3)."""
        key = (module_index, side, d, str(device))
        if key not in self._masks:
            cpu = (module_index, side, d, "cpu")
            if cpu not in self._masks:
                perm = torch.randperm(d, generator=cpu_generator(block_seed(self.seed, module_index, side)))
                self._masks[cpu] = perm[: min(self._keep(side), d)]
            self._masks[key] = self._masks[cpu].to(device)
        return self._masks[key]

    def _draw_factor(self, k: int, side: int, d: int) -> torch.Tensor:
        keep = self.mask(k, side, d)
        p = torch.zeros(len(keep), d, dtype=torch.float64)
        p[torch.arange(len(keep)), keep] = math.sqrt(d / len(keep))
        return p

    def _sketch_side(self, factor: Any, k: int, side: int) -> torch.Tensor:
        values = getattr(factor, "values", None)
        if values is None:  # one-hot: gather columns of the (sparse) mask matrix
            return super()._sketch_side(factor, k, side)
        return self._select(values, k, side)

    def _flat_sketch(self, g: torch.Tensor, k: int) -> torch.Tensor:
        return self._select(g, k, FLAT_STREAM)

    def _select(self, x: torch.Tensor, k: int, side: int) -> torch.Tensor:
        d = x.shape[-1]
        keep = self.mask(k, side, d, x.device)  # cached per device: no host-to-device copy per batch
        return x.index_select(-1, keep) * math.sqrt(d / len(keep))

    # ------------------------------------------------------------------ stage 2: SJLT
    def project_captured(self, capture: Capture) -> torch.Tensor:
        """Hook engine capture -> ``[B, m]`` (masked block sketches, SJLT-mixed)."""
        parts = []
        for k, block in enumerate(capture.blocks):
            parts.append(self._kron_sketch(capture.factors(k), k) if block.kronecker else self._flat_sketch(capture.grads(k), k))
        return self.mixer.project(parts)

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Dense path: flat per-block gradients (featurizer layout, layouts bound) -> ``[B, m]``."""
        return self.mixer.project([self.project_module(g, k) for k, g in enumerate(grads)])

    def output_dim(self, dims: Sequence[int]) -> int:
        _check_dims(dims)
        return self.m

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Explicit ``[m, sum(dims)]`` = SJLT matrix · block-diagonal masked Kronecker. For tests."""
        stage1 = super().matrix(dims, dtype)  # [Σ_k m_k', sum(dims)]
        widths = [self._block_matrix(k, d, dtype).shape[0] for k, d in enumerate(_check_dims(dims))]
        return self.mixer.matrix(widths, dtype) @ stage1

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "m": self.m, "m_out": self.m_out, "m_in": self.m_in, "c": self.c, "seed": self.seed}

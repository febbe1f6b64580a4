"""FactGraSS-style sketch: coordinate masks on the layer factors, Kronecker product, then SJLT.

Stage 1 (per Linear/Conv2d module ``k``) is the factorized sketch of
:mod:`sketchattr.project.factorized` with the Gaussian factors replaced by scaled coordinate
masks: ``M_in`` keeps ``m_in' = min(m_in, d_in(+1))`` coordinates of ``a`` and ``M_out`` keeps
``m_out' = min(m_out, d_out)`` coordinates of ``s``, each scaled by ``sqrt(d / m')`` so that
``E[MᵀM] = I``.  Applied to the captured factors it costs an index-select instead of a matmul::

    z_k = Σ_t (M_out s_t) ⊗ (M_in a_t) = (M_out ⊗ M_in) vec(DW_k)        # [m_out' * m_in']

Stage 2 mixes every module's ``z_k`` into one ``m``-dimensional row with an
:class:`~sketchattr.project.sjlt.SJLTProjector` (module ``k`` of the SJLT is ``z_k``), so rows
are ``[B, m]`` like those of the dense projectors, and ``P = S · blockdiag(M_out,k ⊗ M_in,k)``.

**Generation rule.**  With ``gen(k, side) = torch.Generator(device="cpu").manual_seed(
block_seed(seed, k, side))`` (side 0: out, 1: in), the kept coordinates are
``torch.randperm(d, generator=gen(k, side))[:m']`` (in that order; ``m' = min(m_side, d)``).  The
SJLT stage is ``SJLTProjector(m, seed=block_seed(seed, 0, 2), c=c)`` over the modules' ``z_k``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .base import DEFAULT_BLOCK_SIZE, _check_dims, _check_int, block_seed, cpu_generator
from .factorized import FactorizedProjector, square_split
from .sjlt import SJLTProjector

__all__ = ["FactGraSSProjector"]


class FactGraSSProjector(FactorizedProjector, name="factgrass"):
    """Mask → Kronecker → SJLT sketch of Linear/Conv2d gradients; rows ``[B, m]``.

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
    def mask(self, module_index: int, side: int, d: int, device: "torch.device | str" = "cpu") -> torch.Tensor:
        """Kept coordinates (int64, ``[min(m_side, d)]``, on ``device``) of module
        ``module_index``'s input (``side`` 1) or output gradient (``side`` 0) of width ``d``."""
        key = (module_index, side, d, str(device))
        if key not in self._masks:
            cpu = (module_index, side, d, "cpu")
            if cpu not in self._masks:
                keep = min(self.m_out if side == 0 else self.m_in, d)
                perm = torch.randperm(d, generator=cpu_generator(block_seed(self.seed, module_index, side)))
                self._masks[cpu] = perm[:keep]
            self._masks[key] = self._masks[cpu].to(device)
        return self._masks[key]

    def _draw_factor(self, k: int, side: int, d: int) -> torch.Tensor:
        keep = self.mask(k, side, d)
        p = torch.zeros(len(keep), d, dtype=torch.float64)
        p[torch.arange(len(keep)), keep] = math.sqrt(d / len(keep))
        return p

    def _sketch_in(self, a: torch.Tensor, k: int) -> torch.Tensor:
        return self._select(a, k, 1)

    def _sketch_out(self, s: torch.Tensor, k: int) -> torch.Tensor:
        return self._select(s, k, 0)

    def _select(self, x: torch.Tensor, k: int, side: int) -> torch.Tensor:
        d = x.shape[-1]
        keep = self.mask(k, side, d, x.device)  # cached per device: no host-to-device copy per batch
        return x.index_select(-1, keep) * math.sqrt(d / len(keep))

    # ------------------------------------------------------------------ stage 2: SJLT
    def project_layers(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Captured ``(a, s)`` of every module -> ``[B, m]`` (masked Kronecker sketches, SJLT-mixed)."""
        return self.mixer.project([self.project_factors(a, s, k) for k, (a, s) in enumerate(factors)])

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Dense path: flat per-module blocks (featurizer layout, shapes bound) -> ``[B, m]``."""
        return self.mixer.project([self.project_module(g, k) for k, g in enumerate(grads)])

    def output_dim(self, dims: Sequence[int]) -> int:
        _check_dims(dims)
        return self.m

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Explicit ``[m, sum(dims)]`` = SJLT matrix · block-diagonal masked Kronecker. For tests."""
        stage1 = super().matrix(dims, dtype)  # [Σ_k m_out'·m_in', sum(dims)]
        widths = []
        for k, d in enumerate(_check_dims(dims)):
            d_out, d_in, bias = self._shape(k, d)
            widths.append(min(self.m_out, d_out) * min(self.m_in, d_in + bias))
        return self.mixer.matrix(widths, dtype) @ stage1

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "m": self.m, "m_out": self.m_out, "m_in": self.m_in, "c": self.c, "seed": self.seed}


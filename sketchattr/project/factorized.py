"""Factorized (Kronecker, LoGra-style) sketch of every block the hook engine can factor.

For a Kronecker block ``k`` (:class:`~sketchattr.featurize.rules.KronLayout`: Linear, Conv,
transformers' Conv1D, Embedding, tied uses summed) the per-example gradient as a matrix is
``G_i = Σ_t row_t col_tᵀ`` (``[rows(+1), cols(+1)]``, the bias an extra column or row).  With
two small random matrices ``P_out [m_out, rows(+1)]`` and ``P_in [m_in, cols(+1)]`` the block's
sketch is

    vec(P_out G_i P_inᵀ) = Σ_t (P_out row_t) ⊗ (P_in col_t)          # [m_out * m_in]
                         = (P_out ⊗ P_in) vec(G_i)

with row-major ``vec``. :meth:`FactorizedProjector.project_captured` computes it from the
hook engine's factors without forming ``G_i`` (a one-hot Embedding factor costs a gather).
For Linear/Conv ``rows`` are output channels and ``cols`` inputs (``P_out`` acts on the output
gradient, ``P_in`` on the input, as in LoGra). A block without Kronecker structure (norm
weights, a lone bias: :class:`~sketchattr.featurize.rules.FlatLayout`) is sketched from its
exact gradient with a dense Gaussian ``P_flat [m_out * m_in, d]``.

**Layout.**  The featurizer's flat block is the weight flattened as stored, then the bias; the
layout maps it to ``G`` (:meth:`KronLayout.from_flat`), so :meth:`project` and :meth:`matrix`
work on flat blocks: ``project(blocks) == rows @ matrix(dims).T``.

**Rows are concatenated, not summed.**  Unlike the dense projectors (``P = [P_0 | P_1 | ...]``,
per-module sketches summed into one ``m``), the row of an example is the concatenation over the
selected blocks of their ``m_out * m_in`` sketches: ``m = K * m_out * m_in`` for ``K`` blocks,
and :meth:`matrix` is block-diagonal.  The FactGraSS-style variant
(:class:`~sketchattr.project.factgrass.FactGraSSProjector`) replaces the Gaussian factors by
coordinate masks and mixes the blocks' sketches with a second, SJLT stage into one ``m``.

**Generation rule** (what the tests rebuild).  With ``gen(b) = torch.Generator(device="cpu")
.manual_seed(block_seed(seed, k, b))``::

    P_out  = torch.randn(m_out, rows(+1),  generator=gen(0), dtype=torch.float32) / sqrt(m_out)
    P_in   = torch.randn(m_in,  cols(+1),  generator=gen(1), dtype=torch.float32) / sqrt(m_in)
    P_flat = torch.randn(m_out * m_in, d,  generator=gen(3), dtype=torch.float32) / sqrt(m_out * m_in)

drawn on CPU in float32 and then cast to the input's dtype and device.

**Shapes.**  The projector needs the block layouts: :meth:`bind` them once (the
:class:`~sketchattr.featurize.Featurizer` does so when it resolves its module selection).
``(d_out, d_in, bias)`` tuples are accepted for Linear-like blocks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sketchattr.core.capture import Capture
from sketchattr.core.kronecker import DenseFactor
from sketchattr.core.layout import BlockLayout, FlatLayout, KronLayout
from sketchattr.project.base import (
    DEFAULT_BLOCK_SIZE,
    Projector,
    _check_dims,
    _check_grads,
    _check_int,
    block_seed,
    cpu_generator,
    square_split,
)

__all__ = ["FactorizedProjector", "square_split"]

FLAT_STREAM = 3
"""Stream index (``block_seed(seed, k, 3)``) of the dense factor of a block without Kronecker structure."""


class FactorizedProjector(Projector, name="factorized"):
    """Kronecker sketch ``(P_out ⊗ P_in) vec(G)`` per block; see the module docstring.

    Args:
        m_out, m_in: per-block factor sizes; each block's sketch has ``m_out * m_in``
            coordinates and rows concatenate the blocks' sketches.
        seed: int >= 0; with the block index it determines ``P_out``, ``P_in`` and ``P_flat``.
        block_size: accepted for a uniform constructor; unused.
    """
    def __init__(self, m_out: int, m_in: int, seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE):
        self.m_out = _check_int("m_out", m_out, minimum=1)
        self.m_in = _check_int("m_in", m_in, minimum=1)
        super().__init__(self.m_out * self.m_in, seed=seed, block_size=block_size)  # m: per block
        self.layouts: list[BlockLayout] | None = None
        self._factors: dict[Any, torch.Tensor] = {}

    # ------------------------------------------------------------------ layouts
    def bind(self, layouts: Sequence[Any]) -> "FactorizedProjector":
        """Set the block layouts (one per block, in order): :class:`KronLayout`,
        :class:`FlatLayout`, or ``(d_out, d_in, bias)`` for a Linear-like block (``d_in``
        without the bias column; Conv2d: ``C_in * kh * kw``). Returns ``self``."""
        checked: list[BlockLayout] = []
        for k, lay in enumerate(layouts):
            if isinstance(lay, (KronLayout, FlatLayout)):
                checked.append(lay)
                continue
            d_out, d_in, bias = lay
            checked.append(KronLayout(_check_int(f"layouts[{k}].d_out", d_out, 1), _check_int(f"layouts[{k}].d_in", d_in, 1),
                                      "col" if bias else None))
        if not checked:
            raise ValueError("layouts must be a non-empty list (one per block)")
        self.layouts = checked
        return self

    def _layout(self, k: int, d: int) -> BlockLayout:
        if self.layouts is None:
            raise ValueError(
                "FactorizedProjector needs the block layouts for flat gradient blocks: call "
                "bind([(d_out, d_in, bias) or KronLayout/FlatLayout, ...]) first (a Featurizer binds them itself)"
            )
        if k >= len(self.layouts):
            raise ValueError(f"block index {k} is out of range: {len(self.layouts)} layout(s) bound")
        lay = self.layouts[k]
        if d != lay.dim:
            raise ValueError(f"block {k}: width {d} does not match the bound layout {lay} with {lay.dim} parameters")
        return lay

    # ------------------------------------------------------------------ random factors
    def factors(
        self, module_index: int, d_out: int, d_in: int, dtype: torch.dtype = torch.float32,
        device: "torch.device | str" = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_out [m_out, d_out], P_in [m_in, d_in])`` of block ``module_index`` (widths with
        the bias coordinate), cast to ``dtype`` on ``device``."""
        k = _check_int("module_index", module_index, minimum=0)
        return self.factor(k, 0, d_out, dtype, device), self.factor(k, 1, d_in, dtype, device)

    def factor(
        self, module_index: int, side: int, d: int, dtype: torch.dtype = torch.float32,
        device: "torch.device | str" = "cpu",
    ) -> torch.Tensor:
        """One factor as a matrix: ``side`` 0 is ``P_out [m_out, d]``, 1 is ``P_in [m_in, d]``,
        3 is ``P_flat [m_out * m_in, d]`` (each from its own stream ``block_seed(seed, k, side)``)."""
        key = (module_index, side, d, dtype, str(device))
        cached = self._factors.get(key)
        if cached is None:
            cached = self._draw_factor(module_index, side, d).to(device=device, dtype=dtype)
            self._factors[key] = cached
        return cached

    def _draw_factor(self, k: int, side: int, d: int) -> torch.Tensor:
        rows = {0: self.m_out, 1: self.m_in, FLAT_STREAM: self.m_out * self.m_in}[side]
        p = torch.randn(rows, d, generator=cpu_generator(block_seed(self.seed, k, side)), dtype=torch.float32)
        return p.div_(math.sqrt(rows))

    # ------------------------------------------------------------------ public API
    def output_dim(self, dims: Sequence[int]) -> int:
        """``len(dims) * m_out * m_in``: the blocks' sketches are concatenated."""
        return len(_check_dims(dims)) * self.m

    def project_factors(self, a: torch.Tensor, s: torch.Tensor, module_index: int) -> torch.Tensor:
        """``Σ_t (P_out s_t) ⊗ (P_in a_t)`` of one Linear-like use: ``a [B, T, d_in(+1)]``
        (column factor), ``s [B, T, d_out]`` (row factor) -> ``[B, m_out*m_in]``. Never forms ``G``."""
        if a.dim() != 3 or s.dim() != 3 or a.shape[:2] != s.shape[:2]:
            raise ValueError(f"a and s must be [B, T, d] with the same B and T, got {tuple(a.shape)} and {tuple(s.shape)}")
        if a.dtype != s.dtype or not a.is_floating_point():
            raise ValueError(f"a and s must share a floating dtype, got {a.dtype} and {s.dtype}")

        k = _check_int("module_index", module_index, minimum=0)
        return self._kron_sketch([(DenseFactor(s), DenseFactor(a))], k)

    def _kron_sketch(self, pairs: Sequence[tuple[Any, Any]], k: int) -> torch.Tensor:
        """``Σ_pairs Σ_t (P_out row_t) ⊗ (P_in col_t)`` -> ``[B, m_out * m_in]``."""
        out = None
        for row, col in pairs:
            pr = self._sketch_side(row, k, 0)  # [B, T, m_out]
            pc = self._sketch_side(col, k, 1)  # [B, T, m_in]
            z = torch.einsum("btk,btl->bkl", pr, pc)
            out = z if out is None else out + z
        return out.reshape(out.shape[0], -1)

    def _sketch_side(self, factor: Any, k: int, side: int) -> torch.Tensor:
        """``factor @ P_sideᵀ``: ``[B, T, d]`` -> ``[B, T, m_side]``."""
        like = getattr(factor, "values", None)
        dtype = like.dtype if like is not None else factor.dtype
        device = like.device if like is not None else factor.index.device
        return factor.project(self.factor(k, side, factor.width, dtype, device))

    def _flat_sketch(self, g: torch.Tensor, k: int) -> torch.Tensor:
        """A block without Kronecker structure: ``g [B, d] @ P_flatᵀ``."""
        return g @ self.factor(k, FLAT_STREAM, g.shape[1], g.dtype, g.device).T

    def project_captured(self, capture: Capture) -> torch.Tensor:
        """Rows of a batch from the hook engine's capture: the concatenated block sketches
        ``[B, K * m_out * m_in]`` (Kronecker blocks from their factors, others from their gradients)."""
        parts = []
        for k, block in enumerate(capture.blocks):
            if block.kronecker:
                parts.append(self._kron_sketch(capture.factors(k), k))
            else:
                parts.append(self._flat_sketch(capture.grads(k), k))
        return torch.cat(parts, dim=1)

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Dense path: flat per-block gradients ``[B, d_k]`` (featurizer layout, layouts bound) ->
        ``[B, K * m_out * m_in]`` (concatenated block sketches)."""
        grads = _check_grads(grads)
        return torch.cat([self._project_flat(g, k) for k, g in enumerate(grads)], dim=1)

    def project_module(self, g: torch.Tensor, module_index: int) -> torch.Tensor:
        """One block's flat gradient ``[B, d_k]`` -> its sketch ``[B, m_out * m_in]``."""
        (g,) = _check_grads([g])
        return self._project_flat(g, _check_int("module_index", module_index, minimum=0))

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Explicit ``[K * m_out * m_in, sum(dims)]``: block-diagonal; block ``k`` is
        ``kron(P_out, P_in)`` with its columns in the featurizer layout (or ``P_flat``). For tests."""
        return torch.block_diag(*[self._block_matrix(k, d, dtype) for k, d in enumerate(_check_dims(dims))])

    def _block_matrix(self, k: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        lay = self._layout(k, d)
        if not isinstance(lay, KronLayout):
            return self.factor(k, FLAT_STREAM, d, dtype)
        r, c = lay.shape
        kron = torch.kron(self.factor(k, 0, r, dtype), self.factor(k, 1, c, dtype))  # columns: vec(G) row-major
        return lay.to_flat(kron.reshape(-1, r, c))

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "m_out": self.m_out, "m_in": self.m_in, "seed": self.seed}

    # ------------------------------------------------------------------ internals
    def _project_flat(self, g: torch.Tensor, k: int) -> torch.Tensor:
        lay = self._layout(k, g.shape[1])
        if not isinstance(lay, KronLayout):
            return self._flat_sketch(g, k)
        mat = lay.from_flat(g)  # [B, rows(+1), cols(+1)]
        p_out, p_in = self.factors(k, mat.shape[1], mat.shape[2], g.dtype, g.device)
        return (p_out @ mat @ p_in.T).reshape(g.shape[0], -1)

    def _accumulate(self, out: torch.Tensor, g: torch.Tensor, k: int) -> None:  # pragma: no cover
        raise NotImplementedError("FactorizedProjector overrides project() directly")

    def _module_matrix(self, d: int, k: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("FactorizedProjector overrides matrix() directly")

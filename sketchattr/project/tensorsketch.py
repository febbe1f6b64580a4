"""TensorSketch: an SJLT of a Kronecker-structured gradient without forming it.

A count sketch (one ±1 per column) of ``vec(G)`` whose hash splits over the two sides of a
Kronecker block: coordinate ``(p, q)`` of block ``k`` (row p, column q of ``G_k``, see
:mod:`sketchattr.core.kronecker`) goes to bucket ``(h_out(p) + h_in(q)) mod m`` with sign
``s_out(p)·s_in(q)``. Then ``P vec(Σ_t row_t col_tᵀ) = Σ_t CS_out(row_t) ⊛ CS_in(col_t)`` — a
circular convolution of the two sides' count sketches — computed with FFTs (Pham & Pagh 2013):

    z_k = irfft( Σ_t rfft(CS_out(row_t)) · rfft(CS_in(col_t)) )                      # [m]

Cost per position O(rows + cols + m log m) instead of O(rows · cols): the per-example gradient
is never formed, like the factorized sketch, but every gradient coordinate is kept (as in SJLT
with c = 1: each column of P has one ±1, so E‖P g‖² = ‖g‖²) — no coordinate is dropped, unlike
FactGraSS's masks. Blocks without Kronecker structure are count-sketched from their exact
gradient. Every block has its own hashes and all blocks add into one ``m``-dimensional row.

**Generation rule.** For block ``k`` and side ``side`` (0: rows, 1: columns, 3: a flat block),
with ``g = torch.Generator(device="cpu").manual_seed(block_seed(seed, k, side))``:
``h = torch.randint(0, m, (d,), generator=g)`` then ``s = 2 * torch.randint(0, 2, (d,), generator=g) - 1``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sketchattr.core.kronecker import OneHotFactor
from sketchattr.core.layout import KronLayout
from sketchattr.project.base import DEFAULT_BLOCK_SIZE, _check_dims, _check_grads, _check_int, block_seed, cpu_generator
from sketchattr.project.factorized import FLAT_STREAM, FactorizedProjector

__all__ = ["TensorSketchProjector"]


class TensorSketchProjector(FactorizedProjector, name="tensorsketch"):
    """Count sketch of every block's gradient with a Kronecker-split hash, via FFT; rows ``[B, m]``.

    Args:
        m: sketch size (rows of the store). seed: int >= 0.
    """

    def __init__(self, m: int, seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        m = _check_int("m", m, minimum=1)
        super().__init__(m, 1, seed=seed, block_size=block_size)
        self.m = m
        self._hashes: dict[tuple[int, int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ hashes
    def hash(self, module_index: int, side: int, d: int, device: "torch.device | str" = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(buckets int64 [d] in 0..m-1, signs int64 [d] in ±1) of block ``module_index``'s side."""
        key = (module_index, side, d, str(device))
        if key not in self._hashes:
            cpu = (module_index, side, d, "cpu")
            if cpu not in self._hashes:
                g = cpu_generator(block_seed(self.seed, module_index, side))
                h = torch.randint(0, self.m, (d,), generator=g)
                s = 2 * torch.randint(0, 2, (d,), generator=g) - 1
                self._hashes[cpu] = (h, s)
            self._hashes[key] = tuple(t.to(device) for t in self._hashes[cpu])  # type: ignore[assignment]
        return self._hashes[key]

    def _draw_factor(self, k: int, side: int, d: int) -> torch.Tensor:
        """The count-sketch matrix ``[m, d]`` of one side (one ±1 per column)."""
        h, s = self.hash(k, side, d)
        c = torch.zeros(self.m, d, dtype=torch.float64)
        c[h, torch.arange(d)] = s.double()
        return c

    def _count_sketch(self, x: torch.Tensor, k: int, side: int) -> torch.Tensor:
        """``x [..., d] -> [..., m]``: each coordinate added, signed, to its bucket."""
        h, s = self.hash(k, side, x.shape[-1], x.device)
        out = x.new_zeros(*x.shape[:-1], self.m)
        return out.index_add_(-1, h, x * s.to(x.dtype))

    def _sketch_side(self, factor: Any, k: int, side: int) -> torch.Tensor:
        if isinstance(factor, OneHotFactor):  # e_idx·w: one signed entry at idx's bucket (no [m, vocab] matrix)
            h, s = self.hash(k, side, factor.width, factor.index.device)
            weight = factor.weight if factor.weight is not None else torch.ones(factor.index.shape, dtype=factor.dtype,
                                                                                device=factor.index.device)
            out = weight.new_zeros(*factor.index.shape, self.m)
            return out.scatter_(-1, h[factor.index].unsqueeze(-1), (s[factor.index].to(weight.dtype) * weight).unsqueeze(-1))
        return self._count_sketch(factor.values, k, side)

    # ------------------------------------------------------------------ sketches
    def _kron_sketch(self, pairs: Sequence[tuple[Any, Any]], k: int) -> torch.Tensor:
        """``Σ_pairs Σ_t CS_out(row_t) ⊛ CS_in(col_t)`` -> ``[B, m]``."""
        out = None
        for row, col in pairs:
            z = self._convolve(self._sketch_side(row, k, 0), self._sketch_side(col, k, 1))
            out = z if out is None else out + z
        return out

    def _convolve(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``Σ_t a_t ⊛ b_t`` (circular, length m) for count sketches ``[B, T, m]`` -> ``[B, m]``;
        half precision runs its FFTs in float32 (no half FFT on CPU) and returns in its own dtype."""
        work = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        spectrum = (torch.fft.rfft(a.to(work), n=self.m, dim=-1) * torch.fft.rfft(b.to(work), n=self.m, dim=-1)).sum(dim=1)
        return torch.fft.irfft(spectrum, n=self.m, dim=-1).to(a.dtype)

    def _flat_sketch(self, g: torch.Tensor, k: int) -> torch.Tensor:
        return self._count_sketch(g, k, FLAT_STREAM)

    def _project_flat(self, g: torch.Tensor, k: int) -> torch.Tensor:
        """Dense path for one block: column q of G is position q, paired with the unit vector e_q
        (whose count sketch is column q of the count-sketch matrix)."""
        lay = self._layout(k, g.shape[1])
        if not isinstance(lay, KronLayout):
            return self._flat_sketch(g, k)
        mat = lay.from_flat(g)  # [B, rows, cols]
        b, _, c = mat.shape
        rows = self._count_sketch(mat.transpose(1, 2), k, 0)  # [B, cols, m]
        units = self.factor(k, 1, c, g.dtype, g.device).T  # [cols, m]
        return self._convolve(rows, units.expand(b, c, self.m))

    def project_captured(self, capture: Any) -> torch.Tensor:
        """Hook engine capture -> ``[B, m]``: every block's sketch, summed."""
        out = None
        for k, block in enumerate(capture.blocks):
            z = self._kron_sketch(capture.factors(k), k) if block.kronecker else self._flat_sketch(capture.grads(k), k)
            out = z if out is None else out + z
        return out

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Dense path: flat per-block gradients (featurizer layout, layouts bound) -> ``[B, m]``."""
        grads = _check_grads(grads)
        return torch.stack([self._project_flat(g, k) for k, g in enumerate(grads)]).sum(dim=0)

    def project_module(self, g: torch.Tensor, module_index: int) -> torch.Tensor:
        """One block's flat gradient ``[B, d_k]`` -> its (unsummed) sketch ``[B, m]``."""
        (g,) = _check_grads([g])
        return self._project_flat(g, _check_int("module_index", module_index, minimum=0))

    def output_dim(self, dims: Sequence[int]) -> int:
        _check_dims(dims)
        return self.m

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Explicit ``[m, sum(dims)]`` from the hashes (featurizer layout). For tests."""
        return torch.cat([self._block_matrix(k, d, dtype) for k, d in enumerate(_check_dims(dims))], dim=1)

    def _block_matrix(self, k: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        lay = self._layout(k, d)
        if not isinstance(lay, KronLayout):
            return self.factor(k, FLAT_STREAM, d, dtype)
        r, c = lay.shape
        hr, sr = self.hash(k, 0, r)
        hc, sc = self.hash(k, 1, c)
        bucket = (hr[:, None] + hc[None, :]) % self.m  # [r, c]
        mat = torch.zeros(self.m, r, c, dtype=dtype)
        mat.scatter_(0, bucket[None], (sr[:, None] * sc[None, :]).to(dtype)[None])
        return lay.to_flat(mat)

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "m": self.m, "seed": self.seed}

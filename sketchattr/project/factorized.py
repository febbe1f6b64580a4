"""Factorized (Kronecker, LoGra-style) sketch of Linear/Conv2d gradients.

For a Linear or Conv2d module ``k`` the per-example gradient is ``DW_i = Σ_t s_t a_tᵀ``
(``[d_out, d_in(+1)]``, see :mod:`sketchattr.curvature.capture`: ``a`` gets a trailing 1 and
``DW`` a last column when the module has a trainable bias).  With two small random matrices
``P_out [m_out, d_out]`` and ``P_in [m_in, d_in(+1)]`` the module's sketch is

    vec(P_out DW_i P_inᵀ) = Σ_t (P_out s_t) ⊗ (P_in a_t)            # [m_out * m_in]
                          = (P_out ⊗ P_in) vec(DW_i)

with row-major ``vec`` (entry ``(o, i)`` of ``P_out DW P_inᵀ`` is coordinate ``o * m_in + i``).
:meth:`FactorizedProjector.project_factors` computes it from the captured factors ``(a, s)``
without ever forming ``DW_i``.

**Layout.**  The featurizer's flat block of module ``k`` is the weight flattened as the module
stores it (``[d_out, d_in]`` row-major; Conv2d ``[C_out, C_in, kh, kw]`` matches the ``unfold``
patch order ``C_in, kh, kw``), then the bias ``[d_out]``.  ``DW`` with its bias column is
``[W | b]``, so ``vec(DW)`` is a permutation of that block; :meth:`project` and :meth:`matrix`
apply this permutation, so ``project(blocks) == rows @ matrix(dims).T`` on the featurizer's
layout.

**Rows are concatenated, not summed.**  Unlike the dense projectors (``P = [P_0 | P_1 | ...]``,
per-module sketches summed into one ``m``), the row of an example is the concatenation over the
selected modules of their ``m_out * m_in`` sketches: ``m = K * m_out * m_in`` for ``K`` modules,
and :meth:`matrix` is block-diagonal.  The FactGraSS-style variant
(:class:`~sketchattr.project.factgrass.FactGraSSProjector`) replaces the Gaussian factors by
coordinate masks and mixes the modules' sketches with a second, SJLT stage into one ``m``.

**Generation rule** (what the tests rebuild).  With ``gen(b) = torch.Generator(device="cpu")
.manual_seed(block_seed(seed, k, b))``::

    P_out = torch.randn(m_out, d_out,     generator=gen(0), dtype=torch.float32) / sqrt(m_out)
    P_in  = torch.randn(m_in,  d_in(+1),  generator=gen(1), dtype=torch.float32) / sqrt(m_in)

i.e. entries ``N(0, 1/m_out)`` and ``N(0, 1/m_in)`` (so ``P_out ⊗ P_in`` has entries of variance
``1/(m_out m_in)`` and preserves squared norms in expectation), drawn on CPU in float32 and then
cast to the input's dtype and device.  ``d_in(+1)`` is the width of ``a``, bias column included.

**Shapes.**  :meth:`project_factors` reads the module's shape from ``a`` and ``s``.  The dense
path (:meth:`project`, :meth:`project_module`, :meth:`matrix`) gets flat blocks, which do not say
where the bias column is, so it needs the layer shapes: :meth:`bind` them once (the
:class:`~sketchattr.featurize.Featurizer` does so when it resolves its module selection).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .base import DEFAULT_BLOCK_SIZE, Projector, _check_dims, _check_grads, _check_int, block_seed, cpu_generator

__all__ = ["FactorizedProjector", "square_split"]

LayerShape = tuple[int, int, bool]
"""``(d_out, d_in, bias)``: d_in without the bias column; bias: the block ends with a bias."""


class FactorizedProjector(Projector, name="factorized"):
    """Kronecker sketch ``(P_out ⊗ P_in) vec(DW)`` per Linear/Conv2d module; see the module docstring.

    Args:
        m_out, m_in: per-module factor sizes; each module's sketch has ``m_out * m_in``
            coordinates and rows concatenate the modules' sketches.
        seed: int >= 0; with the module index it determines ``P_out`` and ``P_in``.
        block_size: accepted for a uniform constructor; unused.
    """

    def __init__(self, m_out: int, m_in: int, seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE):
        self.m_out = _check_int("m_out", m_out, minimum=1)
        self.m_in = _check_int("m_in", m_in, minimum=1)
        super().__init__(self.m_out * self.m_in, seed=seed, block_size=block_size)  # m: per module
        self.shapes: list[LayerShape] | None = None
        self._factors: dict[Any, torch.Tensor] = {}

    # ------------------------------------------------------------------ shapes
    def bind(self, shapes: Sequence[tuple[int, int, bool]]) -> "FactorizedProjector":
        """Set the layer shapes ``[(d_out, d_in, bias), ...]`` (one per module, in module order)
        used by the dense path; returns ``self``.  ``d_in`` excludes the bias column
        (Conv2d: ``C_in * kh * kw``)."""
        checked = []
        for k, shape in enumerate(shapes):
            d_out, d_in, bias = shape
            checked.append((_check_int(f"shapes[{k}].d_out", d_out, 1), _check_int(f"shapes[{k}].d_in", d_in, 1), bool(bias)))
        if not checked:
            raise ValueError("shapes must be a non-empty list of (d_out, d_in, bias)")
        self.shapes = checked
        return self

    def _shape(self, k: int, d: int) -> LayerShape:
        if self.shapes is None:
            raise ValueError(
                "FactorizedProjector needs the layer shapes for flat gradient blocks: call "
                "bind([(d_out, d_in, bias), ...]) first (a Featurizer binds them itself)"
            )
        if k >= len(self.shapes):
            raise ValueError(f"module index {k} is out of range: {len(self.shapes)} layer shape(s) bound")
        d_out, d_in, bias = self.shapes[k]
        if d != d_out * (d_in + bias):
            raise ValueError(
                f"module {k}: block width {d} does not match the bound shape (d_out={d_out}, "
                f"d_in={d_in}, bias={bias}) with {d_out * (d_in + bias)} parameters"
            )
        return self.shapes[k]

    # ------------------------------------------------------------------ random factors
    def factors(
        self, module_index: int, d_out: int, d_in: int, dtype: torch.dtype = torch.float32,
        device: "torch.device | str" = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_out [m_out, d_out], P_in [m_in, d_in])`` of module ``module_index`` (``d_in`` here
        is the width of ``a``, bias column included), cast to ``dtype`` on ``device``."""
        k = _check_int("module_index", module_index, minimum=0)
        return self.factor(k, 0, d_out, dtype, device), self.factor(k, 1, d_in, dtype, device)

    def factor(
        self, module_index: int, side: int, d: int, dtype: torch.dtype = torch.float32,
        device: "torch.device | str" = "cpu",
    ) -> torch.Tensor:
        """One factor as a matrix: ``side`` 0 is ``P_out [m_out, d]``, 1 is ``P_in [m_in, d]``
        (each drawn from its own stream ``block_seed(seed, module_index, side)``)."""
        key = (module_index, side, d, dtype, str(device))
        cached = self._factors.get(key)
        if cached is None:
            cached = self._draw_factor(module_index, side, d).to(device=device, dtype=dtype)
            self._factors[key] = cached
        return cached

    def _draw_factor(self, k: int, side: int, d: int) -> torch.Tensor:
        rows = self.m_out if side == 0 else self.m_in
        p = torch.randn(rows, d, generator=cpu_generator(block_seed(self.seed, k, side)), dtype=torch.float32)
        return p.div_(math.sqrt(rows))

    # ------------------------------------------------------------------ public API
    def output_dim(self, dims: Sequence[int]) -> int:
        """``len(dims) * m_out * m_in``: the modules' sketches are concatenated."""
        return len(_check_dims(dims)) * self.m

    def project_factors(self, a: torch.Tensor, s: torch.Tensor, module_index: int) -> torch.Tensor:
        """``Σ_t (P_out s_t) ⊗ (P_in a_t)``: ``a [B, T, d_in(+1)]``, ``s [B, T, d_out]`` -> ``[B, m_out*m_in]``.

        Never forms ``DW``: both factors are projected first, then contracted over ``t``.
        """
        if a.dim() != 3 or s.dim() != 3 or a.shape[:2] != s.shape[:2]:
            raise ValueError(f"a and s must be [B, T, d] with the same B and T, got {tuple(a.shape)} and {tuple(s.shape)}")
        if a.dtype != s.dtype or not a.is_floating_point():
            raise ValueError(f"a and s must share a floating dtype, got {a.dtype} and {s.dtype}")
        k = _check_int("module_index", module_index, minimum=0)
        pa = self._sketch_in(a, k)  # [B, T, m_in]
        ps = self._sketch_out(s, k)  # [B, T, m_out]
        return torch.einsum("btk,btl->bkl", ps, pa).reshape(a.shape[0], -1)

    def project_layers(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Rows of a batch from every module's captured ``(a, s)`` (module order):
        the concatenated :meth:`project_factors` sketches ``[B, K * m_out * m_in]``."""
        return torch.cat([self.project_factors(a, s, k) for k, (a, s) in enumerate(factors)], dim=1)

    def _sketch_in(self, a: torch.Tensor, k: int) -> torch.Tensor:
        """``P_in a``: ``[..., d_in(+1)]`` -> ``[..., m_in]``."""
        return a @ self.factor(k, 1, a.shape[-1], a.dtype, a.device).T

    def _sketch_out(self, s: torch.Tensor, k: int) -> torch.Tensor:
        """``P_out s``: ``[..., d_out]`` -> ``[..., m_out]``."""
        return s @ self.factor(k, 0, s.shape[-1], s.dtype, s.device).T

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Dense path: flat per-module blocks ``[B, d_k]`` (featurizer layout, shapes bound with
        :meth:`bind`) -> ``[B, K * m_out * m_in]`` (concatenated module sketches)."""
        grads = _check_grads(grads)
        return torch.cat([self._project_flat(g, k) for k, g in enumerate(grads)], dim=1)

    def project_module(self, g: torch.Tensor, module_index: int) -> torch.Tensor:
        """One module's flat block ``[B, d_k]`` -> its sketch ``[B, m_out * m_in]``."""
        (g,) = _check_grads([g])
        return self._project_flat(g, _check_int("module_index", module_index, minimum=0))

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Explicit ``[K * m_out * m_in, sum(dims)]``: block-diagonal, block ``k`` is
        ``kron(P_out, P_in)`` with its columns permuted to the featurizer layout.  For tests."""
        dims = _check_dims(dims)
        blocks = []
        for k, d in enumerate(dims):
            d_out, d_in, bias = self._shape(k, d)
            p_out, p_in = self.factors(k, d_out, d_in + bias, dtype)
            kron = torch.kron(p_out, p_in)  # columns: vec(DW) row-major, [m, d_out * (d_in + bias)]
            blocks.append(_dw_to_flat(kron.reshape(-1, d_out, d_in + bias), d_in, bias))
        return torch.block_diag(*blocks)

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "m_out": self.m_out, "m_in": self.m_in, "seed": self.seed}

    # ------------------------------------------------------------------ internals
    def _project_flat(self, g: torch.Tensor, k: int) -> torch.Tensor:
        d_out, d_in, bias = self._shape(k, g.shape[1])
        dw = _flat_to_dw(g, d_out, d_in, bias)  # [B, d_out, d_in(+1)]
        p_out, p_in = self.factors(k, d_out, d_in + bias, g.dtype, g.device)
        return self._sketch_out(self._sketch_in(dw, k).transpose(1, 2), k).transpose(1, 2).reshape(g.shape[0], -1)

    def _accumulate(self, out: torch.Tensor, g: torch.Tensor, k: int) -> None:  # pragma: no cover
        raise NotImplementedError("FactorizedProjector overrides project() directly")

    def _module_matrix(self, d: int, k: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("FactorizedProjector overrides matrix() directly")


def _flat_to_dw(flat: torch.Tensor, d_out: int, d_in: int, bias: bool) -> torch.Tensor:
    """Featurizer layout ``[B, d_out*d_in (+ d_out)]`` -> ``DW [B, d_out, d_in(+1)]`` (bias last column)."""
    b, nw = flat.shape[0], d_out * d_in
    weight = flat[:, :nw].reshape(b, d_out, d_in)
    return torch.cat([weight, flat[:, nw:, None]], dim=2) if bias else weight


def _dw_to_flat(dw: torch.Tensor, d_in: int, bias: bool) -> torch.Tensor:
    """Inverse of :func:`_flat_to_dw`: ``[B, d_out, d_in(+1)]`` -> ``[B, d_out*d_in (+ d_out)]``."""
    weight = dw[:, :, :d_in].reshape(dw.shape[0], -1)
    return torch.cat([weight, dw[:, :, d_in]], dim=1) if bias else weight


def square_split(m: int) -> tuple[int, int]:
    """``(m_out, m_in)`` with ``m_out * m_in == m`` and ``m_in`` the largest divisor <= sqrt(m)."""
    m = _check_int("m", m, minimum=1)
    m_in = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    return m // m_in, m_in

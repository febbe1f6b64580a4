"""A sketch in the curvature's own coordinates: keep the EKFAC eigen-coordinates that carry the scores.

With fitted EKFAC (or KFAC) factors, a Kronecker block's gradient matrix G rotates into the
eigenbasis as ``R = Q_Sᵀ G Q_A`` and the influence of a training example on a query is

    −q·M·g = −Σ_blocks Σ_(j,k) R_q[j,k] R_g[j,k] / (Λ[j,k] + λ)

(blocks without Kronecker structure: the identity basis and the diagonal Λ). Over the training
set ``E[R_g[j,k]²] = Λ[j,k]`` (that is how EKFAC fits Λ), so a coordinate's term has spread about
``Λ/(Λ + λ)`` in whitened units: coordinates with Λ well below λ add little. This projector keeps
the ``m`` coordinates with the largest ``Λ/λ_b`` over all blocks (λ_b the block's damping, by
default 0.1·mean(Λ_b) as in the scorers) and stores ``R_g`` there, so

    EKFACScorer(factors, featurizer with this projector)

scores ``−Σ_kept R_q R_g / (Λ + λ)`` — exact EKFAC restricted to the kept coordinates, no random
noise, fitted once on the store and reused for any number of queries (the scorer preconditions the
query exactly and projects it with the same map: ``P M q = S D⁻¹ Kᵀ q``).

The map is ``P = S · blockdiag(Q_Sᵀ ⊗ Q_Aᵀ)`` (S: the kept rows), linear and data-dependent only
through the factors; its ``spec()`` records the factors' identity, so a store is never read with
other factors.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sketchattr.featurize.rules.factor import DenseFactor
from sketchattr.featurize.rules.layout import KronLayout

from .base import Projector, _check_dims, _check_grads, _check_int

if TYPE_CHECKING:
    from sketchattr.curvature.factors import Factors
    from sketchattr.featurize.engine import BatchCapture

__all__ = ["EigenbasisProjector"]


class EigenbasisProjector(Projector, name="eigenbasis"):
    """Keep the ``m`` EKFAC eigen-coordinates with the largest ``Λ / λ_block``; see the module docstring.

    Args:
        m: columns kept over all blocks (at most the attributed parameters).
        factors: :class:`~sketchattr.curvature.Factors` (``"ekfac"``, or ``"kfac"``: Λ = λ_S λ_Aᵀ)
            of the same model and modules as the featurizer.
        damping: λ per block used to rank coordinates: None = 0.1·mean(Λ) per block (the scorers'
            default), or a float.
        seed: accepted for a uniform constructor; the map is deterministic.
    """

    def __init__(self, m: int, factors: "Factors", damping: float | None = None, seed: int = 0,
                 block_size: int = 8192) -> None:
        super().__init__(m, seed=seed, block_size=block_size)
        if factors is None or factors.kind not in ("ekfac", "kfac"):
            raise ValueError("EigenbasisProjector needs fitted EKFAC or KFAC factors (fit_factors(kind='ekfac'))")
        self.factors, self.damping = factors, damping
        self.names = list(factors.modules)
        layouts = factors.layouts
        self.layouts = [layouts[n] for n in self.names]
        ratios, self._bases, self._offsets = [], [], []
        for name in self.names:
            qs, qa, lam = factors.curvature(name, factors.kind)
            lam = lam.to(torch.float64)
            block_lambda = float(damping) if damping is not None else 0.1 * float(lam.mean())
            if block_lambda <= 0:
                raise ValueError(f"module {name!r} has zero curvature: pass an explicit damping > 0")
            ratios.append((lam / block_lambda).reshape(-1))
            self._bases.append((qs, qa))
        total = sum(len(r) for r in ratios)
        self.m = _check_int("m", m, minimum=1)
        if self.m > total:
            raise ValueError(f"m={self.m} is more than the {total} coordinates of the selected blocks")
        flat = torch.cat(ratios)
        keep = torch.topk(flat, self.m).indices.sort().values
        starts = torch.tensor([0] + [len(r) for r in ratios]).cumsum(0)
        self.kept = [keep[(keep >= starts[b]) & (keep < starts[b + 1])] - starts[b] for b in range(len(ratios))]
        self.captured = float(flat[keep].div(flat[keep] + 1).sum() / flat.div(flat + 1).sum())
        """Share of the whitened energy Σ Λ/(Λ+λ) (the effective dimension) the kept coordinates hold."""
        self._cache: dict[Any, torch.Tensor] = {}

    # ------------------------------------------------------------------ binding
    def bind(self, layouts: Sequence[Any]) -> "EigenbasisProjector":
        """Check that the featurizer's blocks are the factors' blocks (same layouts, same order)."""
        layouts = list(layouts)
        if layouts != self.layouts:
            raise ValueError(f"the featurizer's blocks {layouts} are not the factors' blocks {self.layouts} "
                             f"(modules {self.names}): select the same modules for both")
        return self

    # ------------------------------------------------------------------ projection
    def output_dim(self, dims: Sequence[int]) -> int:
        _check_dims(dims)
        return self.m

    def _basis(self, b: int, side: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        q = self._bases[b][side]
        if q is None:
            return None
        key = (b, side, dtype, str(device))
        if key not in self._cache:
            self._cache[key] = q.to(device=device, dtype=dtype)
        return self._cache[key]

    def _keep_rotated(self, rot: torch.Tensor, b: int) -> torch.Tensor:
        """``[B, r, c]`` rotated matrices -> the kept coordinates ``[B, m_b]``."""
        return rot.reshape(rot.shape[0], -1).index_select(1, self.kept[b].to(rot.device))

    def _rotate(self, mat: torch.Tensor, b: int) -> torch.Tensor:
        qs, qa = self._basis(b, 0, mat.dtype, mat.device), self._basis(b, 1, mat.dtype, mat.device)
        if qs is not None:
            mat = qs.T @ mat
        if qa is not None:
            mat = mat @ qa
        return mat

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flat per-block gradients ``[B, d_k]`` (featurizer layout) -> kept eigen-coordinates ``[B, m]``."""
        grads = _check_grads(grads)
        if len(grads) != len(self.layouts):
            raise ValueError(f"{len(grads)} blocks given, the factors have {len(self.layouts)}")
        return torch.cat([self._keep_rotated(self._rotate(lay.from_flat(g), b), b)
                          for b, (g, lay) in enumerate(zip(grads, self.layouts))], dim=1)

    def project_captured(self, capture: "BatchCapture") -> torch.Tensor:
        """From the hook engine: dense Kronecker factors are rotated first (``Σ_t (Q_Sᵀ row_t)(Q_Aᵀ col_t)ᵀ``),
        other blocks rotate their exact gradient."""
        parts = []
        for b, block in enumerate(capture.blocks):
            pairs = capture.factors(b) if block.kronecker else []
            if pairs and all(isinstance(r, DenseFactor) and isinstance(c, DenseFactor) for r, c in pairs):
                rot = None
                for row, col in pairs:
                    qs = self._basis(b, 0, row.values.dtype, row.values.device)
                    qa = self._basis(b, 1, col.values.dtype, col.values.device)
                    rr = row.values if qs is None else row.values @ qs
                    rc = col.values if qa is None else col.values @ qa
                    z = torch.bmm(rr.transpose(1, 2), rc)
                    rot = z if rot is None else rot + z
                parts.append(self._keep_rotated(rot, b))
            else:
                parts.append(self._keep_rotated(self._rotate(self.layouts[b].from_flat(capture.grads(b)), b), b))
        return torch.cat(parts, dim=1)

    def project_module(self, g: torch.Tensor, module_index: int) -> torch.Tensor:
        """One block's flat gradient -> its kept coordinates ``[B, m_k]``."""
        (g,) = _check_grads([g])
        b = _check_int("module_index", module_index, minimum=0)
        return self._keep_rotated(self._rotate(self.layouts[b].from_flat(g), b), b)

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Explicit ``[m, sum(dims)]`` (block-diagonal rows of ``Q_Sᵀ ⊗ Q_Aᵀ``, featurizer layout). For tests."""
        dims = _check_dims(dims)
        blocks = []
        for b, (d, lay) in enumerate(zip(dims, self.layouts)):
            r, c = lay.shape
            if d != r * c:
                raise ValueError(f"block {b}: width {d} does not match the factors' layout {lay}")
            eye = torch.eye(r * c, dtype=dtype).reshape(r * c, r, c)
            rows = self._rotate(eye, b).reshape(r * c, -1)[:, self.kept[b]].T  # [m_b, r*c]: row k = e_kᵀ rotated
            blocks.append(lay.to_flat(rows.reshape(-1, r, c)))
        return torch.block_diag(*blocks)

    def spec(self) -> dict[str, Any]:
        if "_fingerprint" not in self._cache:
            h = hashlib.sha256(json.dumps(self.factors.metadata, sort_keys=True, default=str).encode())
            for name in self.names:
                for key, t in sorted(self.factors.tensors[name].items()):
                    h.update(key.encode())
                    h.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
            self._cache["_fingerprint"] = h.hexdigest()[:16]
        return {"type": self.name, "m": self.m, "damping": self.damping, "factors": self._cache["_fingerprint"]}

    def _accumulate(self, out: torch.Tensor, g: torch.Tensor, k: int) -> None:  # pragma: no cover
        raise NotImplementedError("EigenbasisProjector overrides project() directly")

    def _module_matrix(self, d: int, k: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("EigenbasisProjector overrides matrix() directly")

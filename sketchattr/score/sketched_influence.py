"""Regularized sketched influence: scores = −q̂ᵀ(F̂ + λI)⁻¹ĝ_i with F̂ = (1/n) Σ ĝ_i ĝ_iᵀ.

One float64 eigendecomposition at ``fit``; each λ afterwards is a diagonal rescale, so λ grids
cost one matrix product each. When m > n the n×n Gram matrix K = (1/n) Ĝ Ĝᵀ is decomposed
instead (push-through identity (ĜᵀĜ/n + λI)⁻¹Ĝᵀ = Ĝᵀ(ĜĜᵀ/n + λI)⁻¹), which is exact.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sketchattr.score.base import Scorer
from sketchattr.score.damping import auto_damping, effective_dimension
from sketchattr.store import GradientStore



class SketchedInfluence(Scorer, name="sketched_influence"):
    """Regularized (damped) influence on sketched gradients.

    damping: ``"auto"`` (default; see :func:`sketchattr.score.damping.auto_damping`) or λ > 0.
    method: ``"auto"`` (Gram form when m > n), ``"eigen"`` (m×m) or ``"gram"`` (n×n).
    dtype: dtype of the solve (float64 by default).

    After ``fit``: ``sigma`` (eigenvalues of F̂, descending), ``damping_`` (resolved λ),
    ``sigma_max``, ``effective_dimension(λ)``.
    """

    def __init__(self, damping: "float | str" = "auto", method: str = "auto", dtype: torch.dtype = torch.float64) -> None:
        if method not in ("auto", "eigen", "gram"):
            raise ValueError(f"method must be 'auto', 'eigen' or 'gram', got {method!r}")
        if not (damping == "auto" or _is_positive(damping)):
            raise ValueError(f"damping must be 'auto' or a float > 0, got {damping!r}")
        self.damping = damping
        self.method = method
        self.dtype = dtype

    # ------------------------------------------------------------------ fitting
    def fit(self, store: "GradientStore | torch.Tensor", indices: np.ndarray | None = None) -> "SketchedInfluence":
        """Decompose F̂ (or the Gram matrix) of the store's rows [n_train, m]."""
        if isinstance(store, torch.Tensor):
            rows = store
            self.train_indices = np.arange(rows.shape[0]) if indices is None else np.asarray(indices)
        else:
            rows = store.rows()
            self.train_indices = store.indices
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"train rows must be a non-empty [n_train, m] matrix, got {tuple(rows.shape)}")
        if not torch.isfinite(rows).all():
            raise ValueError("train rows contain NaN/inf")
        G = rows.to(self.dtype)
        n, m = G.shape
        self.n_train, self.dim = n, m
        self.path = ("gram" if m > n else "eigen") if self.method == "auto" else self.method
        if self.path == "eigen":
            sigma, vecs = torch.linalg.eigh(G.T @ G / n)
        else:
            sigma, vecs = torch.linalg.eigh(G @ G.T / n)
        order = torch.argsort(sigma, descending=True)
        self.sigma = sigma[order].clamp(min=0)
        self._vecs = vecs[:, order]
        self._G = G
        self.sigma_max = float(self.sigma[0])
        self.damping_ = self.resolve_damping(self.damping)
        return self

    def resolve_damping(self, damping: "float | str | None" = None) -> float:
        """λ for a damping setting (``None`` → the fitted ``damping_``)."""
        self._check_fitted()
        if damping is None:
            return self.damping_
        if damping == "auto":
            return auto_damping(self.sigma, self.dim)
        if not _is_positive(damping):
            raise ValueError(f"damping must be 'auto' or a float > 0, got {damping!r}")
        return float(damping)

    def effective_dimension(self, damping: "float | str | None" = None) -> float:
        """d_λ = tr(F̂(F̂ + λI)⁻¹) at λ (default: the fitted λ)."""
        return effective_dimension(self.sigma, self.resolve_damping(damping))

    # ------------------------------------------------------------------ scoring
    def score(self, queries: torch.Tensor, damping: "float | str | None" = None) -> torch.Tensor:
        """Scores [n_query, n_train] = −q̂ᵀ(F̂ + λI)⁻¹ĝ_i for query rows [n_query, m]."""
        q = self._check_queries(queries)
        lam = self.resolve_damping(damping)
        return -self._weighted(self._query_coords(q), lam) @ self._train_coords().T

    def score_grid(self, queries: torch.Tensor, dampings: Sequence[float]) -> torch.Tensor:
        """Scores for several λ at once: [n_lambda, n_query, n_train], one decomposition."""
        q = self._check_queries(queries)
        coords, train = self._query_coords(q), self._train_coords()
        return torch.stack([-self._weighted(coords, self.resolve_damping(l)) @ train.T for l in dampings])

    def precondition(self, queries: torch.Tensor, damping: "float | str | None" = None) -> torch.Tensor:
        """(F̂ + λI)⁻¹ q̂ for query rows [n_query, m] -> [n_query, m]."""
        q = self._check_queries(queries)
        lam = self.resolve_damping(damping)
        if self.path == "eigen":
            return self._weighted(q @ self._vecs, lam) @ self._vecs.T
        # Woodbury: (F̂+λI)⁻¹ = (I − Ĝᵀ U diag(1/(n(σ+λ))) Uᵀ Ĝ) / λ
        a = (q @ self._G.T) @ self._vecs
        return (q - (a / (self.n_train * (self.sigma + lam))) @ self._vecs.T @ self._G) / lam

    def self_influence(self, damping: "float | str | None" = None) -> torch.Tensor:
        """ĝ_iᵀ(F̂ + λI)⁻¹ĝ_i ≥ 0 for every train row: [n_train]."""
        self._check_fitted()
        lam = self.resolve_damping(damping)
        if self.path == "eigen":
            c = self._train_coords()
            return (c * c / (self.sigma + lam)).sum(dim=1)
        u = self._vecs
        return self.n_train * (u * u * self.sigma / (self.sigma + lam)).sum(dim=1)

    # ------------------------------------------------------------------ internals
    def _query_coords(self, q: torch.Tensor) -> torch.Tensor:
        """Query coordinates in the eigenbasis: q̂V (eigen) or q̂ĜᵀU (gram)."""
        return q @ self._vecs if self.path == "eigen" else (q @ self._G.T) @ self._vecs

    def _train_coords(self) -> torch.Tensor:
        """Train rows in the eigenbasis: ĜV (eigen) or U (gram). Computed once, cached."""
        if not hasattr(self, "_train_coords_cache"):
            self._train_coords_cache = self._G @ self._vecs if self.path == "eigen" else self._vecs
        return self._train_coords_cache

    def _weighted(self, coords: torch.Tensor, lam: float) -> torch.Tensor:
        return coords / (self.sigma + lam)

    def _check_queries(self, queries: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"query rows must be [n_query, {self.dim}] (the store's width), got {tuple(queries.shape)}: "
                "were they sketched with the same projector?"
            )
        if not torch.isfinite(queries).all():
            raise ValueError("query rows contain NaN/inf")
        return queries.to(device=self._G.device, dtype=self.dtype)


def _is_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and np.isfinite(x)

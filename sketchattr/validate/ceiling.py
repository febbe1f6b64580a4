"""The LDS noise ceiling: how well even the exact expected output could rank against a seed-averaged
ground truth.

Retraining is noisy: subset k's measured output is y_k = mu_k + e_k with e_k the training seed's noise.
With two extra single-seed replicates of the same subsets, r = corr(y^a, y^b) (Spearman across subsets,
per query) is the output's reliability, and by the Spearman-Brown formula the expected output mu ranks
against an average of R seeds at

    ceiling = sqrt(R r / (1 + (R - 1) r)).

No attribution method can be expected to exceed it; a linear one (a sum of per-example scores) reaches
less wherever mu is not additive in the examples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sketchattr.validate.lds import ArrayLike, _spearman_columns, _to_numpy


@dataclass(frozen=True)
class NoiseCeiling:
    """``reliability`` [n_query]: Spearman between the two replicates; ``per_query`` [n_query]: the ceiling;
    ``mean``: its mean over queries; ``pooled``: the ceiling at the mean reliability (the per-query
    reliabilities are noisy, and the square root's curvature biases the mean of per-query ceilings low)."""

    reliability: np.ndarray
    per_query: np.ndarray
    mean: float
    pooled: float


def lds_noise_ceiling(replicate_a: ArrayLike, replicate_b: ArrayLike, n_seeds: int) -> NoiseCeiling:
    """The LDS ceiling of a ground truth averaged over ``n_seeds`` training seeds per subset, from two
    single-seed replicates [K, n_query] of the same subsets (trained with seeds the ground truth did not use)."""
    a = _to_numpy(replicate_a).astype(np.float64, copy=False)
    b = _to_numpy(replicate_b).astype(np.float64, copy=False)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"replicates: expected two arrays of one shape [K, n_query], found {a.shape} and {b.shape}")
    if a.shape[0] < 3:
        raise ValueError(f"replicates: need at least 3 subsets to rank, found K={a.shape[0]}")
    if n_seeds < 1:
        raise ValueError(f"n_seeds: the ground truth's seeds per subset, at least 1, found {n_seeds}")

    def ceiling(r):
        r = np.clip(r, 0.0, 1.0)
        return np.sqrt(n_seeds * r / (1 + (n_seeds - 1) * r))

    r = _spearman_columns(a, b)
    finite = np.isfinite(r)
    if not finite.any():
        raise ValueError("replicates: every query's output is constant across subsets; there is nothing to rank")
    per_query = ceiling(r)
    return NoiseCeiling(reliability=r, per_query=per_query, mean=float(per_query[finite].mean()),
                        pooled=float(ceiling(r[finite].mean())))

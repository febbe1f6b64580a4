"""Leave-one-out (LOO) ground truth and correlation: a second yardstick beside LDS.

For each removed train position i, the effect of *including* i on query q is
Δ[i, q] = f(z_q; θ_all) − f(z_q; θ_{all∖i}), averaged over training seeds shared by the full and
the leave-one-out runs (common random numbers). Scores predict it directly: scores[q, i] ≈ Δ[i, q].
LOO differences of SGD-trained networks are small against seed noise, so expect low correlations
from every method; they rank methods, they do not certify one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from sketchattr.validate.ground_truth import MeasureFn, TrainFn, subset_ground_truth
from sketchattr.validate.lds import _spearman_columns, _to_numpy


@dataclass(frozen=True)
class LOOGroundTruth:
    """removed: train positions left out [L]; delta: f(all) − f(all∖i) per removed i and query [L, n_query]."""

    removed: np.ndarray
    delta: np.ndarray


def loo_ground_truth(
    path: "str | os.PathLike[str]",
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    *,
    n_train: int,
    removed: Sequence[int],
    n_seeds: int = 4,
    progress: bool = True,
    workers: int = 1,
) -> LOOGroundTruth:
    """Retrain on all rows and on all-but-i for each i in ``removed``; cached and resumable at ``path``."""
    removed = np.asarray(removed, dtype=np.int64)
    if removed.size == 0 or removed.min() < 0 or removed.max() >= n_train:
        raise ValueError(f"removed must be non-empty positions in [0, {n_train})")
    everything = np.arange(n_train)
    subsets = [everything] + [np.delete(everything, i) for i in removed]
    gt = subset_ground_truth(Path(path), train_fn, measure_fn, n_train=n_train, n_seeds=n_seeds, progress=progress,
                             workers=workers, subsets=subsets, shared_seeds=True, attrs={"kind": "leave-one-out"})
    return LOOGroundTruth(removed=removed, delta=gt.outputs[0][None, :] - gt.outputs[1:])


def loo_correlation(scores: np.ndarray, truth: LOOGroundTruth) -> tuple[float, np.ndarray]:
    """Per-query Spearman correlation over the removed examples between scores[q, removed] and
    Δ[:, q]; returns (nan-safe mean, per-query [n_query])."""
    s = _to_numpy(scores).astype(np.float64)
    if s.ndim != 2 or s.shape[0] != truth.delta.shape[1]:
        raise ValueError(f"scores must be [n_query={truth.delta.shape[1]}, n_train], got {tuple(s.shape)}")
    per_query = _spearman_columns(s[:, truth.removed].T, truth.delta)
    finite = np.isfinite(per_query)
    return (float(per_query[finite].mean()) if finite.any() else float("nan")), per_query

"""Selecting training data by its scores against a target set (LESS-style)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Selection", "aggregate_scores", "select_training_data"]

AGGREGATES = ("max", "mean")


@dataclass
class Selection:
    """The chosen training rows, best first: dataset ``indices [k]`` and aggregated ``scores [k]``."""

    indices: np.ndarray
    scores: torch.Tensor


def aggregate_scores(scores: torch.Tensor, how: str = "max") -> torch.Tensor:
    """``[n_target, n_train]`` -> ``[n_train]``: the best (``"max"``, LESS) or the average
    (``"mean"``) score of each training row over the target set."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be [n_target, n_train] with n_target >= 1, got {tuple(scores.shape)}")
    return scores.max(dim=0).values if how == "max" else scores.mean(dim=0)


def select_training_data(scores: torch.Tensor, train_indices: np.ndarray | None = None, fraction: float | None = None,
                         k: int | None = None, aggregate: str = "max") -> Selection:
    """The top ``k`` (or ``fraction`` of the) training rows by :func:`aggregate_scores`.

    scores: ``[n_target, n_train]`` (e.g. ``TracIn(..., variant="cos").score(targets)``, cosine
    similarities of Adam-preconditioned train gradients and target gradients, LESS);
    train_indices: the rows' dataset indices (``scorer.train_indices``; default 0..n_train-1).
    """
    agg = aggregate_scores(scores, aggregate)
    n = agg.shape[0]
    if (fraction is None) == (k is None):
        raise ValueError("give exactly one of fraction= and k=")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        k = max(1, int(round(fraction * n)))
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    idx = np.arange(n) if train_indices is None else np.asarray(train_indices)
    if len(idx) != n:
        raise ValueError(f"{len(idx)} train indices for {n} score columns")
    values, order = torch.topk(agg, k)
    return Selection(idx[order.cpu().numpy()], values)

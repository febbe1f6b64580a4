"""Top-k proponents and opponents of each query, named by dataset index."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TopK:
    """For each query, the k training examples with the highest (proponents) and lowest
    (opponents) scores. Index arrays hold *dataset* indices. Shapes [n_query, k]."""

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def top_k(scores: torch.Tensor, train_indices: np.ndarray, k: int) -> TopK:
    """Select top-k from a score matrix [n_query, n_train] whose columns are ``train_indices``."""
    if scores.ndim != 2 or scores.shape[1] != len(train_indices):
        raise ValueError(f"scores must be [n_query, {len(train_indices)}], got {tuple(scores.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    hi = torch.topk(scores, k, dim=1, largest=True)
    lo = torch.topk(scores, k, dim=1, largest=False)
    idx = np.asarray(train_indices)
    return TopK(
        proponents=idx[hi.indices.cpu().numpy()],
        proponent_scores=hi.values.cpu().numpy(),
        opponents=idx[lo.indices.cpu().numpy()],
        opponent_scores=lo.values.cpu().numpy(),
    )

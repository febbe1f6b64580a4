"""Top-k proponents and opponents of each query, named by dataset index."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TopK:
    """For each query, the k training examples with the highest (proponents) and lowest
    (opponents) scores: ``torch.Tensor`` on the CPU, like every scorer's scores. Index tensors
    (int64) hold *dataset* indices (``.tolist()`` gives Python ints, e.g. for dict keys). Shapes
    [n_query, k]."""

    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor


class TopKMerger:
    """Running top-k over score blocks [n_query, b] with their dataset indices [b]."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self._hi: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lo: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, scores: torch.Tensor, indices: np.ndarray) -> None:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=scores.device).expand(scores.shape[0], -1)
        self._hi = self._merge(self._hi, scores, idx, largest=True)
        self._lo = self._merge(self._lo, scores, idx, largest=False)

    def add(self, top: TopK) -> None:
        """Merge another (partial) top-k [n_query, k'] into this one (e.g. another rank's)."""
        as_t = lambda a: torch.as_tensor(a).cpu()
        self._hi = self._merge(self._hi, as_t(top.proponent_scores), as_t(top.proponents), largest=True)
        self._lo = self._merge(self._lo, as_t(top.opponent_scores), as_t(top.opponents), largest=False)

    def _merge(self, best, scores, idx, largest: bool):
        if best is not None:
            scores = torch.cat([best[0], scores], dim=1)
            idx = torch.cat([best[1], idx], dim=1)
        k = min(self.k, scores.shape[1])
        top = torch.topk(scores, k, dim=1, largest=largest)
        return top.values, torch.gather(idx, 1, top.indices)

    def result(self) -> TopK:
        if self._hi is None or self._hi[0].shape[1] < self.k:
            raise ValueError(f"fewer than k={self.k} training rows were scored")
        return TopK(
            proponents=self._hi[1].cpu(),
            proponent_scores=self._hi[0].cpu(),
            opponents=self._lo[1].cpu(),
            opponent_scores=self._lo[0].cpu(),
        )


def top_k(scores: torch.Tensor, train_indices: np.ndarray, k: int) -> TopK:
    """Select top-k from a score matrix [n_query, n_train] whose columns are ``train_indices``."""
    if scores.ndim != 2 or scores.shape[1] != len(train_indices):
        raise ValueError(f"scores must be [n_query, {len(train_indices)}], got {tuple(scores.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    merger = TopKMerger(k)
    merger.update(scores, train_indices)
    return merger.result()

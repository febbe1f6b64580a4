"""The digits-mlp bench data: sklearn ``load_digits`` split into 1000 train rows and 100 queries.

Rule: X = digits.data / 16 (float32), y int64; ``perm = np.random.RandomState(0).permutation(1797)``;
train = ``perm[:1000]``, queries = ``perm[1000:1100]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

N_TRAIN = 1000
N_QUERY = 100
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    """Tensors of the bench split (shapes: x_* [N, 64] float32, y_* [N] int64).

    ``train_index`` / ``query_index`` are the original row indices into ``load_digits`` (numpy int arrays).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    train_index: np.ndarray
    query_index: np.ndarray

    def train_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_train, self.y_train)

    def query_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_query, self.y_query)


@lru_cache(maxsize=1)
def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def load_digits_split() -> DigitsSplit:
    """Return the fixed bench split (1000 train, 100 query rows). Fresh tensors each call."""
    x, y = _load_arrays()
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(x))
    tr, q = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_QUERY]
    return DigitsSplit(
        x_train=torch.from_numpy(x[tr].copy()),
        y_train=torch.from_numpy(y[tr].copy()),
        x_query=torch.from_numpy(x[q].copy()),
        y_query=torch.from_numpy(y[q].copy()),
        train_index=tr.copy(),
        query_index=q.copy(),
    )

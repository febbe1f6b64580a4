"""Scorer base class: fit on a store once, then score many query batches, streaming the store."""
from __future__ import annotations

import abc
import os
from typing import Any, ClassVar, Iterator

import h5py
import numpy as np
import torch

from sketchattr.score.topk import TopK, TopKMerger
from sketchattr.store import GradientStore, MemoryStore, StoreMetadata
from sketchattr.registry import Registered


def as_store(rows: "GradientStore | torch.Tensor", indices: np.ndarray | None = None) -> GradientStore:
    """Wrap a plain tensor of train rows [n_train, m] as an in-memory store (indices default 0..n-1)."""
    if isinstance(rows, GradientStore):
        return rows
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.shape[0] == 0:
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"train rows must be a store or a non-empty [n_train, m] tensor, got {shape}")
    store = MemoryStore()
    store.prepare(StoreMetadata(projector={"type": "given"}, modules={}, model_fingerprint="", task="", dim=rows.shape[1]))
    store.write(np.arange(rows.shape[0]) if indices is None else np.asarray(indices), rows)
    return store


class Scorer(Registered, abc.ABC):
    """Base of scorers. Subclasses register under ``name`` via ``class X(Scorer, name="x")``.

    Scores follow the sign convention of DESIGN.md: ``scores[q, i]`` is the predicted change of
    the query's measurement when training example i is up-weighted; shape [n_query, n_train].
    Subclasses implement ``fit`` and ``iter_scores`` (score blocks over the store); the base
    builds ``score``, the streaming ``top_k`` and ``score_to_hdf5`` from it.
    """

    name: ClassVar[str]
    registry: ClassVar[dict[str, type["Scorer"]]] = {}
    kind: ClassVar[str] = "scorer"
    train_indices: np.ndarray

    @abc.abstractmethod
    def fit(self, store: GradientStore) -> "Scorer":
        """Read the store once and prepare to score."""

    @abc.abstractmethod
    def iter_scores(self, queries: torch.Tensor, **kwargs: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (train dataset indices [b], scores [n_query, b]) block by block."""

    def score(self, queries: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Scores [n_query, n_train] for query rows [n_query, m] (columns in store row order)."""
        return torch.cat([s for _, s in self.iter_scores(queries, **kwargs)], dim=1)

    def top_k(self, queries: torch.Tensor, k: int = 10, **kwargs: Any) -> TopK:
        """Top-k proponents/opponents of each query by dataset index, merged block by block
        (memory O(n_query·(k + block)), never the full score matrix)."""
        self._check_fitted()
        if not 1 <= k <= len(self.train_indices):
            raise ValueError(f"k must be in [1, {len(self.train_indices)}], got {k}")
        merger = TopKMerger(k)
        for idx, block in self.iter_scores(queries, **kwargs):
            merger.update(block, idx)
        return merger.result()

    def score_to_hdf5(
        self, queries: torch.Tensor, path: "str | os.PathLike[str]", dataset: str = "scores", k: int | None = None, **kwargs: Any
    ) -> TopK | None:
        """Write the full score matrix [n_query, n_train] (float32) to ``path`` in column
        chunks, with ``train_indices`` beside it; optionally also return the top-k."""
        self._check_fitted()
        n_q, n = queries.shape[0], len(self.train_indices)
        merger = TopKMerger(k) if k else None
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with h5py.File(path, "a") as f:
            if dataset in f:
                del f[dataset]
            dset = f.create_dataset(dataset, shape=(n_q, n), dtype=np.float32, chunks=(min(n_q, 256), min(n, 4096)))
            f.require_dataset("train_indices", shape=(n,), dtype=np.int64)[:] = self.train_indices
            col = 0
            for idx, block in self.iter_scores(queries, **kwargs):
                dset[:, col : col + len(idx)] = block.float().cpu().numpy()
                col += len(idx)
                if merger:
                    merger.update(block, idx)
        return merger.result() if merger else None

    def _check_fitted(self) -> None:
        if not hasattr(self, "train_indices"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(store) first")

"""Scorer base class: fit on a store once, then score many query batches, streaming the store."""
from __future__ import annotations

import abc
import os
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import h5py
import numpy as np
import torch

from sketchattr.core.registry import Registered
from sketchattr.distributed.shards import join_scores, shard_path
from sketchattr.score.topk import TopK, TopKMerger
from sketchattr.store import GradientStore, MemoryStore, StoreMetadata, StoreMismatchError
from sketchattr.store.atomic import carry_over, temporary_beside

if TYPE_CHECKING:
    from sketchattr.distributed.collective import Collective


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

    Scores follow the sign convention of docs/design.md: ``scores[q, i]`` is the predicted change of
    the query's measurement when training example i is up-weighted; shape [n_query, n_train].
    Subclasses implement ``fit`` and ``iter_scores`` (score blocks over the store); the base
    builds ``score``, the streaming ``top_k`` and ``score_to_hdf5`` from it. Every scorer takes
    its queries in the same forms (:mod:`sketchattr.score.queries`: a Dataset, a DataLoader, a
    tuple of tensors, or rows that carry their sketch) and returns ``torch.Tensor`` scores and
    :class:`TopK` of tensors.

    Distributed (``fit(shard, collective=...)``, see :mod:`sketchattr.distributed`): each rank
    streams its own shard of the store (``shard_indices``; ``iter_scores`` covers it), while
    ``train_indices``, ``score``, ``top_k`` and ``score_to_hdf5`` are about the whole train set,
    in the row order of a single-process store, on every rank.
    """
    name: ClassVar[str]
    registry: ClassVar[dict[str, type["Scorer"]]] = {}
    kind: ClassVar[str] = "scorer"
    train_indices: np.ndarray
    collective: "Collective | None" = None

    @abc.abstractmethod
    def fit(self, store: GradientStore) -> "Scorer":
        """Read the store once and prepare to score."""
    @abc.abstractmethod
    def iter_scores(self, queries: Any, **kwargs: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (train dataset indices [b], scores [n_query, b]) block by block."""
    def score_rows(self, queries: Any, rows: torch.Tensor) -> torch.Tensor:
        """Scores ``[n_query, n_rows]`` of the queries (as :meth:`score` takes them) against
        train-side rows ``[n_rows, m]`` sketched like the store's — rows of examples outside the
        store, or per-token rows (:func:`~sketchattr.score.per_token.per_token_scores`)."""
        raise NotImplementedError(f"{type(self).__name__} does not score rows outside its store")

    def score(self, queries: Any, **kwargs: Any) -> torch.Tensor:
        """Scores [n_query, n_train] (columns in store row order, dataset indices ``train_indices``)."""
        return self._gather_columns(torch.cat([s for _, s in self.iter_scores(queries, **kwargs)], dim=1))

    def top_k(self, queries: Any, k: int = 10, **kwargs: Any) -> TopK:
        """Top-k proponents/opponents of each query by dataset index, merged block by block
        (memory O(n_query·(k + block)), never the full score matrix) and across ranks."""
        self._check_fitted()
        if not 1 <= k <= len(self.train_indices):
            raise ValueError(f"k must be in [1, {len(self.train_indices)}], got {k}")
        merger = TopKMerger(min(k, len(self._local_indices())))
        for idx, block in self.iter_scores(queries, **kwargs):
            merger.update(block, idx)
        return self._merged(merger, k)

    def score_to_hdf5(
        self, queries: Any, path: "str | os.PathLike[str]", dataset: str = "scores", k: int | None = None, **kwargs: Any
    ) -> TopK | None:
        """Write the full score matrix [n_query, n_train] (float32) to ``path`` in column
        chunks, with ``train_indices`` beside it; optionally also return the top-k.
        Distributed: each rank writes its columns to ``<stem>.rank<r>-of-<W>.h5`` and rank 0
        joins them into ``path`` (virtual datasets, see :mod:`sketchattr.distributed.shards`)."""
        self._check_fitted()
        c, local = self.collective, self._local_indices()
        target = path
        if c is not None:

            target = shard_path(path, c.rank, c.world_size)
        n = len(local)
        merger = TopKMerger(min(k, n)) if k else None
        tmp = temporary_beside(target)  # built aside and renamed: a crash never leaves a half-written file
        with h5py.File(tmp, "w") as f:
            carry_over(target, f, (dataset, "train_indices"))
            f.create_dataset("train_indices", data=np.asarray(local, dtype=np.int64))
            col, dset = 0, None
            for idx, block in self.iter_scores(queries, **kwargs):
                if dset is None:  # the query count is known once the queries are prepared
                    n_q = block.shape[0]
                    dset = f.create_dataset(dataset, shape=(n_q, n), dtype=np.float32, chunks=(min(n_q, 256), min(n, 4096)),
                                            fletcher32=True)
                dset[:, col : col + len(idx)] = block.float().cpu().numpy()
                col += len(idx)
                if merger:
                    merger.update(block, idx)
        os.replace(tmp, target)
        if c is not None:
            c.barrier()  # every rank's file is complete
            c.together(lambda: c.is_main and join_scores(path, c.world_size, dataset))
        return self._merged(merger, k) if merger else None

    # ------------------------------------------------------------------ shards (torch.distributed)
    def _bind(self, store: GradientStore, collective: "Collective | None") -> None:
        """Bind this rank's ``store`` (all rows without a collective): ``shard_indices`` are its
        rows, ``train_indices`` every rank's in rank order. Ranks must agree on the metadata
        and each hold rows."""
        self.store, self.collective = store, collective
        self.shard_indices = store.indices
        self.train_indices = self.shard_indices
        if collective is None:
            return
        views = collective.gather_objects((store.metadata.to_json() if store.metadata else None, len(store)))
        for rank, (meta, n) in enumerate(views):
            if n == 0:
                raise ValueError(f"rank {rank} holds no train rows: use fewer processes or a smaller batch_size")
            if meta != views[0][0]:
                diff = StoreMetadata.from_json(views[0][0]).differences(StoreMetadata.from_json(meta))
                raise StoreMismatchError(f"the store shard of rank {rank} differs from rank 0's:\n  " + "\n  ".join(diff))
        self.train_indices = collective.cat(torch.from_numpy(np.ascontiguousarray(self.shard_indices))).numpy()

    def _local_indices(self) -> np.ndarray:
        """Dataset indices of the rows this process scores (its shard when distributed)."""
        return self.shard_indices if self.collective is not None else self.train_indices

    def _gather_columns(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Columns of every rank's shard, in train-row order (``local`` itself in one process)."""
        return local if self.collective is None else self.collective.cat(local, dim)

    def _merged(self, merger: TopKMerger, k: int) -> TopK:
        """The top-k of ``merger``, merged over the ranks' shards when distributed."""
        if self.collective is None:
            return merger.result()
        total = TopKMerger(k)
        for part in self.collective.gather_objects(merger.result()):
            total.add(part)
        return total.result()

    def _check_fitted(self) -> None:
        if not hasattr(self, "train_indices"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(store) first")

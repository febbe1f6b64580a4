"""TracIn over checkpoints on sketched gradient stores (Pruthi et al. 2020).

    scores[q, i] = − Σ_c η_c ∇f_c(z_q)ᵀ ∇ℓ_c(z_i)

over checkpoints c with learning rates η_c, f the task's measurement (the margin for
classification) and ℓ the training loss — the sign convention of docs/design.md: positive = training
example i helps query q. With projected stores the gradients are the sketches ĝ = P g (one
projector, same seed and m, for every checkpoint). ``variant="cos"`` unit-normalises each train
row and each query row per checkpoint before the dot product (grad-cos).

One store per checkpoint, each written by a :class:`~sketchattr.featurize.Featurizer` on that
checkpoint's model with the same projector and the same train indices, e.g.
``DiskStore(path, checkpoint=f"ckpt{c}")`` (one HDF5 group per checkpoint) or MemoryStores.
:func:`tracin_from_checkpoints` builds featurizers and stores from a list of models.

>>> tracin = tracin_from_checkpoints([m1, m2, m3], task, train_set, learning_rates=0.05,
...                                  projector="gaussian", m=256, modules=2,
...                                  sampler=make_sampler("stratified", key="labels", rate=0.1))
>>> top = tracin.top_k(test_set, k=10)    # dataset indices of proponents / opponents
>>> scores = tracin.score(test_set)       # [n_query, n_train]

Store importance weights (from a sampler) are not used by the scores: TracIn scores each
sampled example on its own; the weights stay in the stores for estimates of totals.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from sketchattr.featurize.featurizer import Featurizer
from sketchattr.score.checkpoints import featurize_checkpoints
from sketchattr.score.queries import QueryRows, is_dataset_like
from sketchattr.score.base import Scorer
from sketchattr.score.topk import TopK
from sketchattr.store.base import require_dense_rows
from sketchattr.store import GradientStore, StoreMismatchError, aligned_blocks

_STORAGE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_DEFAULT_BLOCK_ROWS = 8192


class TracInQueries:
    """Query rows of one query set, one ``[n_query, m]`` tensor per checkpoint.

    Returned by :meth:`TracIn.query_rows`; :meth:`TracIn.score`, ``top_k``, ``iter_scores`` and
    ``score_to_hdf5`` accept it in place of a dataset (no gradients are recomputed).
    """

    def __init__(self, rows: Sequence[torch.Tensor]) -> None:
        self.rows = list(rows)
        if not self.rows or any(r.ndim != 2 for r in self.rows):
            raise ValueError("TracInQueries needs one [n_query, m] tensor per checkpoint")
        n = {r.shape[0] for r in self.rows}
        if len(n) != 1:
            raise ValueError(f"query rows of the checkpoints have different numbers of rows: {sorted(n)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_query, n_checkpoints, m)."""
        return (self.rows[0].shape[0], len(self.rows), self.rows[0].shape[1])

    def __len__(self) -> int:
        return self.rows[0].shape[0]


class TracIn(Scorer, name="tracin"):
    """TracIn / grad-cos summed over checkpoints.

    featurizers: one :class:`Featurizer` per checkpoint (that checkpoint's model, the same
        projector spec and module selection for all); used to compute query gradients.
    learning_rates: η_c, one per checkpoint or one float for all (default 1.0).
    variant: ``"dot"`` (TracIn, grad-dot) or ``"cos"`` (grad-cos: rows unit-normalised per
        checkpoint; a zero row scores 0).
    cache_queries: keep query rows per (query dataset object, its length, checkpoint) so that
        scoring the same dataset object again does not recompute gradients;
        :meth:`clear_query_cache` empties it.
    block_rows: train rows per streamed block (default 8192; all checkpoint stores are read
        block by block together, so memory is O(n_ckpt · block_rows · m)).
    dtype: dtype of the score products (default: the rows' dtype, at least float32).
    """

    def __init__(
        self,
        featurizers: Sequence[Featurizer],
        learning_rates: "Sequence[float] | float" = 1.0,
        variant: str = "dot",
        cache_queries: bool = True,
        block_rows: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(featurizers, Featurizer):
            featurizers = [featurizers]
        self.featurizers = list(featurizers)
        if not self.featurizers:
            raise ValueError("TracIn needs at least one checkpoint featurizer")
        if not all(isinstance(f, Featurizer) for f in self.featurizers):
            raise TypeError("featurizers must be sketchattr Featurizer objects, one per checkpoint")
        n = len(self.featurizers)
        if isinstance(learning_rates, (int, float)) and not isinstance(learning_rates, bool):
            lrs = [float(learning_rates)] * n
        else:
            lrs = [float(x) for x in learning_rates]
        if len(lrs) != n:
            raise ValueError(f"{len(lrs)} learning rates for {n} checkpoints")
        if not all(np.isfinite(lrs)):
            raise ValueError(f"learning rates must be finite, got {lrs}")
        self.learning_rates = lrs
        if variant not in ("dot", "cos"):
            raise ValueError(f"variant must be 'dot' or 'cos', got {variant!r}")
        self.variant = variant
        self.cache_queries = bool(cache_queries)
        if block_rows is not None and block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows = block_rows
        self.dtype = dtype
        self._cache: dict[tuple[int, int, int], tuple[Any, torch.Tensor]] = {}
        specs = {repr(f.projector.spec()) for f in self.featurizers}
        if len(specs) != 1:
            raise ValueError(f"every checkpoint must use the same projector (type, m, seed); got {sorted(specs)}")

    @property
    def n_checkpoints(self) -> int:
        return len(self.featurizers)

    # ------------------------------------------------------------------ fitting
    def fit(self, stores: "Sequence[GradientStore] | GradientStore") -> "TracIn":
        """Bind one store per checkpoint (same order as the featurizers).

        Checks: as many stores as featurizers; each store's metadata equals its featurizer's
        (:class:`StoreMismatchError` otherwise: another model, projector, seed, module set or
        task); every store holds the same dataset indices in the same order.
        """
        if isinstance(stores, GradientStore):
            stores = [stores]
        stores = list(stores)
        if len(stores) != self.n_checkpoints:
            raise ValueError(f"{len(stores)} stores for {self.n_checkpoints} checkpoints: give one store per featurizer")
        for c, (store, feat) in enumerate(zip(stores, self.featurizers)):
            if store.metadata is None or len(store) == 0:
                raise ValueError(f"the store of checkpoint {c} holds no rows: featurize the training set first")
            require_dense_rows(store.metadata, "TracIn")
            want = feat.metadata("train")
            try:
                store.metadata.check_matches(want)
            except StoreMismatchError as exc:
                raise StoreMismatchError(f"checkpoint {c}: {exc}") from None
        ref = stores[0].indices
        for c, store in enumerate(stores[1:], start=1):
            idx = store.indices
            if len(idx) != len(ref) or not np.array_equal(idx, ref):
                raise StoreMismatchError(
                    f"the stores hold different train rows: checkpoint 0 has {len(ref)} rows, checkpoint {c} "
                    f"has {len(idx)} (or another order); featurize every checkpoint with the same indices/sampler"
                )
        self.stores = stores
        self.train_indices = np.asarray(ref)
        self.n_train = len(ref)
        self.dim = stores[0].dim
        return self

    # ------------------------------------------------------------------ queries
    def query_rows(self, query_dataset: Any) -> TracInQueries:
        """Measurement-gradient rows of the queries for every checkpoint (cached if enabled).

        query_dataset: a Dataset, DataLoader or tuple of tensors; a :class:`TracInQueries`; or, with
        one checkpoint, that checkpoint featurizer's ``query_rows`` (checked against its store)."""
        if isinstance(query_dataset, TracInQueries):
            if len(query_dataset.rows) != self.n_checkpoints:
                raise ValueError(f"query rows for {len(query_dataset.rows)} checkpoints, expected {self.n_checkpoints}")
            return query_dataset
        if isinstance(query_dataset, QueryRows):
            if self.n_checkpoints != 1:
                raise TypeError(f"TracIn over {self.n_checkpoints} checkpoints needs query rows from every checkpoint's "
                                "model: pass the query dataset (or TracIn.query_rows(dataset))")
            query_dataset.check_matches(self.featurizers[0].metadata("train"), "TracIn")
            return TracInQueries([query_dataset.rows])
        if not is_dataset_like(query_dataset):
            raise TypeError(f"TracIn takes the query examples (a Dataset, a DataLoader or a tuple of tensors) or "
                            f"TracIn.query_rows(...); got {type(query_dataset).__name__}")
        n = len(self.featurizers[0]._dataset_of(query_dataset))
        rows = []
        for c, feat in enumerate(self.featurizers):
            key = (id(query_dataset), n, c)
            hit = self._cache.get(key)
            if hit is not None and hit[0] is query_dataset:
                rows.append(hit[1])
                continue
            r = feat.query_rows(query_dataset).rows
            if self.cache_queries:  # the dataset is kept with its rows so its id cannot be reused
                self._cache[key] = (query_dataset, r)
            rows.append(r)
        return TracInQueries(rows)

    def prepare_queries(self, queries: Any) -> TracInQueries:
        """Every scorer's name for its reusable query form: :meth:`query_rows`."""
        return self.query_rows(queries)

    def clear_query_cache(self) -> None:
        """Forget every cached query row."""
        self._cache.clear()

    # ------------------------------------------------------------------ scoring
    def iter_scores(self, query_dataset: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (train dataset indices [b], scores [n_query, b]), streaming the blocks of all
        checkpoint stores together."""
        self._check_fitted()
        qs = self.query_rows(query_dataset).rows
        for c, q in enumerate(qs):
            if q.shape[1] != self.dim:
                raise ValueError(
                    f"query rows of checkpoint {c} are [n, {q.shape[1]}] but the stores hold width {self.dim}: "
                    "were they sketched with the same projector?"
                )
            if not torch.isfinite(q).all():
                raise ValueError(f"query rows of checkpoint {c} contain NaN/inf")
        prepared: list[torch.Tensor | None] = [None] * self.n_checkpoints
        for idx, blocks in self._aligned_blocks():
            total = None
            for c, rows in enumerate(blocks):
                rows = rows.to(self._work_dtype(rows))
                if prepared[c] is None:
                    q = qs[c].to(device=rows.device, dtype=rows.dtype)
                    prepared[c] = _unit(q) if self.variant == "cos" else q
                if self.variant == "cos":
                    rows = _unit(rows)
                part = prepared[c] @ rows.T
                total = part * (-self.learning_rates[c]) if total is None else total.add_(part, alpha=-self.learning_rates[c])
            yield idx, total

    def score(self, query_dataset: Any) -> torch.Tensor:
        """Scores [n_query, n_train] (columns in store row order, dataset indices ``train_indices``)."""
        return super().score(query_dataset)

    def top_k(self, query_dataset: Any, k: int = 10) -> TopK:
        """Top-k proponents / opponents per query by dataset index (streamed, no full matrix)."""
        return super().top_k(query_dataset, k=k)

    def score_to_hdf5(self, query_dataset: Any, path: Any, dataset: str = "scores", k: int | None = None) -> TopK | None:
        """Write the full [n_query, n_train] matrix to ``path`` in column chunks (see :class:`Scorer`)."""
        return super().score_to_hdf5(self.query_rows(query_dataset), path, dataset=dataset, k=k)

    def self_influence(self) -> torch.Tensor:
        """Σ_c η_c ‖ĝ_c,i‖² for every train row (``"dot"``), or Σ_c η_c over the checkpoints
        where row i is nonzero (``"cos"``: each unit row dotted with itself). [n_train]

        Uses the train-loss gradient on both sides (TracIn's self-influence); positive, no
        minus sign, like :meth:`SketchedInfluence.self_influence`.
        """
        self._check_fitted()
        out = []
        for _, blocks in self._aligned_blocks():
            total = None
            for c, rows in enumerate(blocks):
                rows = rows.to(self._work_dtype(rows))
                sq = (rows * rows).sum(dim=1)
                val = (sq > 0).to(rows.dtype) if self.variant == "cos" else sq
                total = val * self.learning_rates[c] if total is None else total + val * self.learning_rates[c]
            out.append(total)
        return torch.cat(out)

    # ------------------------------------------------------------------ bookkeeping
    def memory_footprint(self) -> dict[str, Any]:
        """Bytes of stored train rows per checkpoint (at their storage dtype; on disk for a
        DiskStore) and of cached query rows."""
        per: dict[str, int] = {}
        if hasattr(self, "stores"):
            for c, store in enumerate(self.stores):
                name = f"{c}:{getattr(store, 'checkpoint', 'memory')}"
                per[name] = int(len(store) * store.dim * _row_itemsize(store))
        cached = sum(r.numel() * r.element_size() for _, r in self._cache.values())
        return {
            "train_rows_bytes": per,
            "train_rows_total_bytes": int(sum(per.values())),
            "query_cache_bytes": int(cached),
            "query_cache_entries": len(self._cache),
        }

    # ------------------------------------------------------------------ internals
    def _work_dtype(self, rows: torch.Tensor) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32

    def _aligned_blocks(self) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        """Blocks of every checkpoint store over the same rows (see :func:`~sketchattr.store.aligned_blocks`)."""
        return aligned_blocks(self.stores, self.block_rows or _DEFAULT_BLOCK_ROWS, label="checkpoint")


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def _row_itemsize(store: GradientStore) -> int:
    sd = getattr(store, "storage_dtype", None)
    if sd in _STORAGE_BYTES:
        return _STORAGE_BYTES[sd]
    for _, rows in store.iter_blocks(1):
        return rows.element_size()
    return 0


def tracin_from_checkpoints(
    models: Sequence[torch.nn.Module],
    task: Any,
    train_dataset: Any,
    learning_rates: "Sequence[float] | float" = 1.0,
    variant: str = "dot",
    cache_queries: bool = True,
    **featurize_options: Any,
) -> TracIn:
    """Featurize ``train_dataset`` on every checkpoint model and return a fitted :class:`TracIn`.

    models: the checkpoint models (one per checkpoint, in order). featurize_options, as
    :func:`~sketchattr.score.checkpoints.featurize_checkpoints`: projector / m / seed (one projector
    spec shared by all checkpoints: ``"identity"``, ``"gaussian"``, ``"sjlt"``, ...); modules
    (``None`` = all, an int N = last N layers, or names); sampler (e.g.
    ``make_sampler("stratified", key="labels", rate=0.1)``; the same seeded sampler for every
    checkpoint, so every store holds the same train indices); store ``"none"`` (memory), ``"cpu"``
    or ``"disk"`` (``path`` = HDF5 file, default ``grad_cache/tracin.h5``, one group ``ckpt<c>`` per
    checkpoint; re-running resumes); ``overwrite`` (discard rows of disk groups written with other
    settings); batch_size, device, progress.
    """
    featurize_options.setdefault("default_path", "grad_cache/tracin.h5")
    featurizers, stores = featurize_checkpoints(models, task, train_dataset, **featurize_options)
    return TracIn(featurizers, learning_rates, variant=variant, cache_queries=cache_queries).fit(stores)

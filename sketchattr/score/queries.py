"""Query rows that carry the identity of the sketch that made them, and the one way every scorer
reads its queries.

Every scorer's ``score`` / ``top_k`` / ``score_to_hdf5`` / ``score_rows`` takes the same inputs:

* a ``Dataset``, a tuple of tensors ``(inputs, labels, ...)`` or a ``DataLoader`` (its dataset,
  in dataset order) — the scorer's featurizer computes the query rows;
* :class:`QueryRows` from ``Featurizer.query_rows`` — checked against the store: rows sketched
  by another projector, seed, module set, model or task are refused (:class:`QueryMismatchError`),
  never scored;
* a scorer's own prepared form (``EKFACScorer.prepare_queries``, ``TracIn.query_rows``).

A plain tensor carries no provenance and is refused unless the store has none either (rows
given as a tensor, :func:`~sketchattr.score.base.as_store`) or it is wrapped explicitly with
:meth:`QueryRows.unchecked`. Scores are always ``torch.Tensor`` ``[n_query, n_train]``; top-k
results are :class:`~sketchattr.score.topk.TopK` of ``torch.Tensor``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sketchattr.store import StoreMetadata, StoreMismatchError

# fields of StoreMetadata that identify a sketch: rows agree on these or are not comparable
# (kind, dtype and the optimizer preconditioner legitimately differ between train and query rows)
SKETCH_FIELDS = ("projector", "modules", "model_fingerprint", "task", "dim")


class QueryMismatchError(StoreMismatchError):
    """Query rows were sketched differently from the store they are scored against."""


@dataclass(frozen=True)
class QueryRows:
    """Sketched query rows ``[n_query, m]`` with what made them.

    rows: the sketched measurement gradients. metadata: the featurizer's
    :class:`~sketchattr.store.StoreMetadata` (projector spec, modules, model fingerprint, task,
    width), or None for rows whose provenance is vouched for by the caller
    (:meth:`unchecked`). indices: dataset indices of the query examples ``[n_query]``.
    """

    rows: torch.Tensor
    metadata: StoreMetadata | None
    indices: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rows, torch.Tensor) or self.rows.ndim != 2:
            found = tuple(self.rows.shape) if isinstance(self.rows, torch.Tensor) else type(self.rows).__name__
            raise ValueError(f"QueryRows holds a [n_query, m] tensor, got {found}")
        if self.metadata is not None and self.metadata.dim != self.rows.shape[1]:
            raise ValueError(f"QueryRows: rows are {self.rows.shape[1]} wide but the metadata says m={self.metadata.dim}")
        if self.indices is not None and len(self.indices) != self.rows.shape[0]:
            raise ValueError(f"QueryRows: {len(self.indices)} indices for {self.rows.shape[0]} rows")

    @classmethod
    def unchecked(cls, rows: torch.Tensor) -> "QueryRows":
        """Rows whose sketch the caller vouches for: scorers use them without a provenance check."""
        return cls(rows, None)

    # -- the rows behave as a tensor: torch functions and tensor methods see ``rows`` and return plain
    #    tensors (derived numbers carry no provenance); selecting queries or moving them keeps it.
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        unwrap = lambda a: a.rows if isinstance(a, QueryRows) else [unwrap(x) for x in a] if isinstance(a, (list, tuple)) else a
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("rows", "metadata", "indices"):
            raise AttributeError(name)
        return getattr(self.rows, name)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __neg__(self) -> torch.Tensor:
        return -self.rows

    def __getitem__(self, item: Any) -> "QueryRows | torch.Tensor":
        """Queries selected by an int, slice, index list or mask keep their provenance; indexing
        columns too (``q[:, a:b]``) gives a plain tensor."""
        if isinstance(item, tuple):
            return self.rows[item]
        if isinstance(item, int):
            item = slice(item, item + 1 if item != -1 else None)
        rows = self.rows[item]
        idx = None if self.indices is None else np.asarray(self.indices)[np.arange(len(self))[item]]
        return QueryRows(rows, self.metadata, idx)

    def to(self, *args: Any, **kwargs: Any) -> "QueryRows":
        """The same queries with ``rows.to(*args, **kwargs)``."""
        return QueryRows(self.rows.to(*args, **kwargs), self.metadata, self.indices)

    def double(self) -> "QueryRows":
        return self.to(torch.float64)

    def float(self) -> "QueryRows":
        return self.to(torch.float32)

    def cpu(self) -> "QueryRows":
        return self.to("cpu")

    def check_matches(self, store_metadata: StoreMetadata | None, scorer: str) -> None:
        """Refuse rows sketched otherwise than the store's (projector, seed, modules, model, task, m)."""
        if self.metadata is None or store_metadata is None or is_anonymous(store_metadata):
            return
        diff = sketch_differences(store_metadata, self.metadata)
        if diff:
            raise QueryMismatchError(
                f"{scorer}: the query rows were sketched differently from the store's rows, so their scores would "
                "be meaningless:\n  " + "\n  ".join(diff)
                + "\nSketch the queries with the featurizer that built the store (featurizer.query_rows(queries))."
            )


def sketch_differences(store: StoreMetadata, queries: StoreMetadata) -> list[str]:
    """The sketch-identity fields on which query rows and a store differ (empty when comparable)."""
    mine, theirs = store.__dict__, queries.__dict__
    return [f"{k}: store has {mine[k]!r}, query rows have {theirs[k]!r}" for k in SKETCH_FIELDS if mine[k] != theirs[k]]


def is_anonymous(metadata: StoreMetadata | None) -> bool:
    """A store made from a plain tensor of rows or by hand (no projector named: nothing to check)."""
    return metadata is not None and metadata.projector.get("type") in (None, "given")


def is_dataset_like(queries: Any) -> bool:
    """Query examples a featurizer can differentiate: a Dataset, a DataLoader, a tuple of tensors, a
    list of examples, or any sized, indexable collection (e.g. a Hugging Face ``datasets.Dataset``)."""
    if isinstance(queries, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        return True
    if isinstance(queries, (torch.Tensor, np.ndarray, QueryRows, str, bytes, dict)):
        return False
    return hasattr(queries, "__len__") and hasattr(queries, "__getitem__")


def checked_rows(queries: Any, store_metadata: StoreMetadata | None, scorer: str, featurizer: Any = None) -> torch.Tensor:
    """The query rows ``[n_query, m]`` a dense-row scorer multiplies, from any accepted query input.

    queries: :class:`QueryRows` (provenance checked against ``store_metadata``), a dataset-like
    (sketched with ``featurizer``), or a plain tensor (only for a store without provenance).
    """
    if isinstance(queries, QueryRows):
        queries.check_matches(store_metadata, scorer)
        return queries.rows
    if is_dataset_like(queries):
        if featurizer is None:
            raise TypeError(
                f"{scorer} got a {type(queries).__name__} of query examples but has no featurizer to sketch them: "
                f"construct it with featurizer=<the featurizer that built the store>, or pass featurizer.query_rows(queries)"
            )
        rows = featurizer.query_rows(queries)
        rows.check_matches(store_metadata, scorer)
        return rows.rows
    if isinstance(queries, torch.Tensor):
        if store_metadata is None or is_anonymous(store_metadata):
            return queries
        raise TypeError(
            f"{scorer} got a plain tensor of query rows {tuple(queries.shape)}: it cannot tell which projector sketched "
            "them. Pass featurizer.query_rows(queries) (rows that carry their sketch), the query dataset itself, or "
            "sketchattr.QueryRows.unchecked(rows) if you vouch that they were sketched like the store"
        )
    raise TypeError(
        f"{scorer} scores queries given as a Dataset, a DataLoader, a tuple of tensors or QueryRows; got {type(queries).__name__}"
    )

"""Query rows that carry the identity of the sketch that made them.

:class:`QueryRows` is what ``Featurizer.query_rows`` returns and every scorer accepts: the rows
``[n_query, m]`` with the featurizer's :class:`~sketchattr.store.StoreMetadata`. Rows sketched by
another projector, seed, module set, model or task than a store's are refused
(:class:`QueryMismatchError`). It lives beside the store metadata it carries, below both the
featurizer that makes it and the scorers that read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sketchattr.store.base import StoreMetadata, StoreMismatchError

__all__ = ["QueryMismatchError", "QueryRows", "SKETCH_FIELDS", "is_anonymous", "sketch_differences"]

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

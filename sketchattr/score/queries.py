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

from typing import Any

import numpy as np
import torch

from sketchattr.store import StoreMetadata
from sketchattr.store.query_rows import QueryMismatchError, QueryRows, is_anonymous, sketch_differences

__all__ = ["QueryMismatchError", "QueryRows", "checked_rows", "is_anonymous", "is_dataset_like", "sketch_differences"]


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

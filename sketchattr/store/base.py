"""GradientStore interface and the metadata that makes a store safe to reuse.

A store holds sketched training rows ``[n_train, m]``, the dataset index of every row, an
importance weight per row (1 unless a sampler says otherwise) and :class:`StoreMetadata`.
Writing follows one protocol for every backend:

    store.prepare(metadata, planned_indices)   # bind; fails on a metadata mismatch
    todo = store.missing(planned_indices)      # rows not yet written (resume)
    store.write(indices, rows, weights)        # any number of times
    store.iter_blocks(block_rows)              # read back written rows, in row order
"""
from __future__ import annotations

import abc
import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from sketchattr.core.registry import Registered
from sketchattr.project import Projector


class StoreMismatchError(ValueError):
    """A store was opened with sketches made by another projector, model, module set or task."""


class StoreCorruptedError(OSError):
    """A store file cannot be read (e.g. truncated by a crash)."""


class StoreLockedError(OSError):
    """Another process is writing the store (its advisory lock file is held)."""


class StoreWriteError(OSError):
    """Rows could not be written (disk full, I/O error); the rows committed before are kept."""


class StoreIncompleteError(ValueError):
    """A reader met a store whose planned rows are not all written (a run cut short or still going);
    open it with ``partial=True`` to read the written rows anyway."""


@dataclass(frozen=True)
class StoreMetadata:
    """What produced a store's rows. Two stores are compatible iff their metadata are equal.

    projector: the projector's ``spec()`` (type, m, seed, ...); modules: names and sizes;
    model_fingerprint: hash of the model's parameters; task: the task's description;
    dim: row width m; kind: ``"train"`` (rows are training-loss gradients); dtype: the dtype the
    gradients were computed in (rows of float64 or bf16 featurizers differ from float32 ones).
    """
    projector: dict[str, Any]
    modules: dict[str, Any]
    model_fingerprint: str
    task: str
    dim: int
    kind: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: str = "torch.float32"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StoreMetadata":
        return cls(**json.loads(text))

    def differences(self, other: "StoreMetadata") -> list[str]:
        """Human-readable list of fields that differ (empty when compatible)."""
        mine, theirs = json.loads(self.to_json()), json.loads(other.to_json())
        return [f"{k}: store has {mine[k]!r}, requested {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

    def check_matches(self, requested: "StoreMetadata") -> None:
        diff = self.differences(requested)
        if diff:
            raise StoreMismatchError(
                "the store was written with different settings and cannot be reused:\n  "
                + "\n  ".join(diff)
                + "\nUse a new store, or pass overwrite=True to discard its rows."
            )


def require_dense_rows(metadata: "StoreMetadata | None", scorer: str) -> None:
    """Refuse a store whose rows are not coordinates of a linear sketch (e.g. ``eigen_topk``
    (value, index) pairs), which only the EKFAC family can read."""
    if metadata is None:
        return

    cls = Projector.registry.get(metadata.projector.get("type", ""))
    if cls is not None and getattr(cls, "sparse_rows", False):
        raise ValueError(f"{scorer} needs rows that are coordinates of a linear sketch; this store holds "
                         f"{metadata.projector['type']} rows (values and indices): score it with EKFACScorer")


class GradientStore(Registered, abc.ABC):
    """Rows of sketched training gradients [n_train, m] with dataset indices [n_train].

    Subclasses register a short name (``class X(GradientStore, name="disk")``) used by
    :func:`make_store` and by the experiment scripts' ``--offload none | cpu | disk``.
    """
    registry: dict[str, type["GradientStore"]] = {}
    kind: ClassVar[str] = "store"
    metadata: StoreMetadata | None

    @abc.abstractmethod
    def prepare(self, metadata: StoreMetadata, planned: np.ndarray | None = None, overwrite: bool = False,
                dataset_fingerprint: str | None = None) -> None:
        """Bind the store to ``metadata`` and declare the dataset indices it will hold.
        Fails with :class:`StoreMismatchError` on a mismatch unless ``overwrite`` — of the metadata,
        or of ``dataset_fingerprint`` (:func:`sketchattr.featurize.fingerprint.dataset_fingerprint`)
        when the store already holds rows of another dataset."""
    @abc.abstractmethod
    def missing(self, indices: np.ndarray) -> np.ndarray:
        """The subset of ``indices`` (order kept) that has no written row yet."""
    @abc.abstractmethod
    def write(self, indices: np.ndarray, rows: torch.Tensor, weights: np.ndarray | None = None) -> None:
        """Write rows [B, m] (and importance weights [B], default 1) for dataset indices [B]."""
    @property
    @abc.abstractmethod
    def indices(self) -> np.ndarray:
        """Dataset indices of the written rows, in row order. [n_train]"""
    @property
    @abc.abstractmethod
    def weights(self) -> np.ndarray:
        """Importance weights of the written rows, in row order. [n_train]"""
    @abc.abstractmethod
    def iter_blocks(self, block_rows: int | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (indices [b], rows [b, m]) of written rows, in row order. ``block_rows=None``:
        the store's own block size (all rows for in-memory stores, a memory budget on disk)."""
    def __len__(self) -> int:
        return len(self.indices)

    @contextlib.contextmanager
    def writing(self) -> Iterator["GradientStore"]:
        """Context for a run of :meth:`write` calls; backends with files keep them open."""
        yield self

    @property
    def dim(self) -> int:
        if self.metadata is None:
            raise ValueError("the store is empty and has no metadata yet")
        return self.metadata.dim

    def rows(self) -> torch.Tensor:
        """All written rows as one tensor [n_train, m] (for stores that fit in memory)."""
        blocks = [r for _, r in self.iter_blocks()]
        if not blocks:
            raise ValueError("the store holds no rows: featurize a training set first")
        return torch.cat(blocks, dim=0)

    def _check_write(self, indices: np.ndarray, rows: torch.Tensor, weights: np.ndarray | None) -> np.ndarray:
        if self.metadata is None:
            raise ValueError("call prepare(metadata) before writing rows")
        if rows.ndim != 2 or rows.shape[1] != self.metadata.dim:
            raise ValueError(f"rows must be [B, {self.metadata.dim}], got {tuple(rows.shape)}")
        if len(indices) != rows.shape[0]:
            raise ValueError(f"{len(indices)} indices for {rows.shape[0]} rows")
        w = np.ones(len(indices)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(w) != len(indices):
            raise ValueError(f"{len(w)} weights for {len(indices)} rows")
        return w


def make_store(offload: "str | GradientStore | None" = None, **kwargs: Any) -> GradientStore:
    """A store by name: ``none``/``memory`` (compute device), ``cpu``, ``disk`` (HDF5), or an
    existing store returned as is. ``kwargs`` go to the store's constructor (``path=...``)."""
    if isinstance(offload, GradientStore):
        return offload
    name = {None: "memory", "none": "memory"}.get(offload, offload)
    if name not in GradientStore.registry:
        raise ValueError(f"unknown store {offload!r}; available: none, {', '.join(sorted(GradientStore.registry))}")
    return GradientStore.registry[name](**kwargs)


def aligned_blocks(
    stores: "Sequence[GradientStore]", block_rows: int | None = None, label: str = "store"
) -> "Iterator[tuple[np.ndarray, list[torch.Tensor]]]":
    """Blocks of several stores over the same train rows, read together: (dataset indices [b],
    [rows_c [b, m_c] per store]). Blocks are re-cut where the stores cut differently; stores
    holding other rows, or running out at different points, raise StoreMismatchError naming the
    ``label`` (e.g. "checkpoint", "member") of the one that differs."""
    its = [s.iter_blocks(block_rows) for s in stores]
    pending: list = [None] * len(its)
    while True:
        for c, it in enumerate(its):
            if pending[c] is None:
                pending[c] = next(it, None)
        if any(p is None for p in pending):
            if any(p is not None for p in pending):
                raise StoreMismatchError(f"the {label} stores ran out of rows at different points")
            return
        take = min(len(p[0]) for p in pending)
        idx0, parts = pending[0][0][:take], []
        for c, (idx, rows) in enumerate(pending):
            if not np.array_equal(idx[:take], idx0):
                raise StoreMismatchError(f"{label} {c}'s store holds other rows than {label} 0's")
            parts.append(rows[:take])
            pending[c] = (idx[take:], rows[take:]) if len(idx) > take else None
        yield idx0, parts

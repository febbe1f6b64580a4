"""Gradient stores: sketched train rows with their dataset indices, weights and metadata.

:class:`MemoryStore` / :class:`CPUStore` (in memory) and :class:`DiskStore` (HDF5: one group per
checkpoint, resumable, checksummed, one locked writer), all read back block by block; the
:class:`StoreMetadata` that identifies a sketch (projector, modules, model, task) and the
:class:`~sketchattr.store.query_rows.QueryRows` that carry it to the scorers.
``make_store("none" | "cpu" | "disk", ...)`` picks one by name.

May import :mod:`sketchattr.project` (to read a projector's spec) and :mod:`sketchattr.core`.
"""
from sketchattr.store.base import (
    GradientStore,
    StoreCorruptedError,
    StoreIncompleteError,
    StoreLockedError,
    StoreWriteError,
    StoreMetadata,
    StoreMismatchError,
    aligned_blocks,
    make_store,
)
from sketchattr.store.hdf5 import DiskStore
from sketchattr.store.memory import CPUStore, MemoryStore

__all__ = [
    "CPUStore", "DiskStore", "GradientStore", "MemoryStore", "StoreCorruptedError", "StoreIncompleteError", "StoreLockedError", "StoreWriteError", "StoreMetadata",
    "StoreMismatchError", "aligned_blocks", "make_store",
]

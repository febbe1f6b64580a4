"""Gradient stores: sketched train rows with their dataset indices, weights and metadata.

``make_store("none" | "cpu" | "disk", ...)`` picks one by the name experiment scripts use for
``--offload``.
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

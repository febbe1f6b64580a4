"""Gradient stores: sketched train rows with their dataset indices and metadata."""
from sketchattr.store.base import GradientStore, StoreMetadata, StoreMismatchError
from sketchattr.store.memory import MemoryStore

__all__ = ["GradientStore", "MemoryStore", "StoreMetadata", "StoreMismatchError"]

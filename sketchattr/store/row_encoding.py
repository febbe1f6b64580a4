"""How a :class:`~sketchattr.store.hdf5.DiskStore` keeps rows on disk: its storage dtypes.

``float32`` and ``float16`` rows are stored as such; ``bfloat16`` rows (which HDF5 has no type for)
as their ``uint16`` bit patterns, so plain h5py reads them back bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

STORAGE: dict[str, type[np.generic]] = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
"""The numpy dtype that stores rows of each storage dtype."""


def to_storage(rows: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """``rows`` (any device and float dtype) as a numpy array of ``storage_dtype``'s on-disk type."""
    rows = rows.detach().cpu()
    if storage_dtype == "bfloat16":
        return rows.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return rows.to(getattr(torch, storage_dtype)).numpy()


def from_storage(arr: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """The rows of an on-disk array, as a CPU tensor of ``storage_dtype`` (sharing its memory)."""
    if storage_dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)

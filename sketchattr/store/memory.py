"""MemoryStore: rows kept as tensors on the compute device."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sketchattr.store.base import GradientStore, StoreMetadata


class MemoryStore(GradientStore):
    """Sketched rows in memory (on ``device``; default: where rows arrive). dtype: storage dtype
    (default: the rows' dtype)."""

    def __init__(self, device: "str | torch.device | None" = None, dtype: torch.dtype | None = None) -> None:
        self.metadata: StoreMetadata | None = None
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._rows: list[torch.Tensor] = []
        self._indices: list[np.ndarray] = []
        self._seen: set[int] = set()

    def prepare(self, metadata: StoreMetadata, overwrite: bool = False) -> None:
        if self.metadata is not None and not overwrite:
            self.metadata.check_matches(metadata)
        if overwrite or self.metadata is None:
            self._rows, self._indices, self._seen = [], [], set()
        self.metadata = metadata

    def append(self, indices: np.ndarray, rows: torch.Tensor) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        self._check_append(indices, rows)
        new = set(indices.tolist())
        if len(new) != len(indices) or new & self._seen:
            raise ValueError(f"dataset indices already in the store: {sorted(new & self._seen)[:10]}")
        self._seen |= new
        rows = rows.detach().to(device=self.device or rows.device, dtype=self.dtype or rows.dtype)
        self._rows.append(rows)
        self._indices.append(indices)

    @property
    def indices(self) -> np.ndarray:
        return np.concatenate(self._indices) if self._indices else np.zeros(0, dtype=np.int64)

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if not self._rows:
            return
        self._consolidate()
        rows, idx = self._rows[0], self._indices[0]
        for s in range(0, rows.shape[0], block_rows):
            yield idx[s : s + block_rows], rows[s : s + block_rows]

    def rows(self) -> torch.Tensor:
        if not self._rows:
            raise ValueError("the store holds no rows: featurize a training set first")
        self._consolidate()
        return self._rows[0]

    def _consolidate(self) -> None:
        if len(self._rows) > 1:
            self._rows = [torch.cat(self._rows, dim=0)]
            self._indices = [np.concatenate(self._indices)]

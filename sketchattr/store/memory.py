"""MemoryStore (rows on the compute device) and CPUStore (rows in host memory, pinned with CUDA)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sketchattr.store.base import GradientStore, StoreMetadata, StoreMismatchError


class MemoryStore(GradientStore, name="memory"):
    """Sketched rows held as tensors.

    device: where rows live (default: where they arrive). dtype: storage dtype (default: the
    rows' dtype; e.g. ``torch.bfloat16`` halves memory).
    """

    def __init__(self, device: "str | torch.device | None" = None, dtype: torch.dtype | None = None) -> None:
        self.metadata: StoreMetadata | None = None
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._reset()

    def _reset(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._indices: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._seen: set[int] = set()

    def prepare(self, metadata: StoreMetadata, planned: np.ndarray | None = None, overwrite: bool = False,
                dataset_fingerprint: str | None = None) -> None:
        if self.metadata is not None and not overwrite:
            self.metadata.check_matches(metadata)
            held = getattr(self, "dataset_fingerprint", None)
            if dataset_fingerprint is not None and held is not None and held != dataset_fingerprint:
                raise StoreMismatchError(f"the store holds rows of another dataset (fingerprint {held}, this one "
                                         f"{dataset_fingerprint}); use a new store, or overwrite=True")
        if overwrite or self.metadata is None:
            self._reset()
        self.metadata = metadata
        if dataset_fingerprint is not None:
            self.dataset_fingerprint = dataset_fingerprint

    def missing(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        return indices[[int(i) not in self._seen for i in indices]] if len(indices) else indices

    def write(self, indices: np.ndarray, rows: torch.Tensor, weights: np.ndarray | None = None) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        w = self._check_write(indices, rows, weights)
        new = set(indices.tolist())
        if len(new) != len(indices) or new & self._seen:
            raise ValueError(f"dataset indices already in the store: {sorted(new & self._seen)[:10]}")
        self._seen |= new
        self._rows.append(self._place(rows.detach()))
        self._indices.append(indices)
        self._weights.append(w)

    def _place(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(device=self.device or rows.device, dtype=self.dtype or rows.dtype)

    @property
    def indices(self) -> np.ndarray:
        self._consolidate()
        return self._indices[0] if self._indices else np.zeros(0, dtype=np.int64)

    @property
    def weights(self) -> np.ndarray:
        self._consolidate()
        return self._weights[0] if self._weights else np.zeros(0)

    def iter_blocks(self, block_rows: int | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if not self._rows:
            return
        self._consolidate()
        rows, idx = self._rows[0], self._indices[0]
        block_rows = block_rows or max(rows.shape[0], 1)
        for s in range(0, rows.shape[0], block_rows):
            yield idx[s : s + block_rows], rows[s : s + block_rows]

    def rows(self) -> torch.Tensor:
        if not self._rows:
            raise ValueError("the store holds no rows: featurize a training set first")
        self._consolidate()
        return self._rows[0]

    def _consolidate(self) -> None:
        if len(self._rows) > 1:
            self._rows = [self._place(torch.cat(self._rows, dim=0))]
            self._indices = [np.concatenate(self._indices)]
            self._weights = [np.concatenate(self._weights)]


class CPUStore(MemoryStore, name="cpu"):
    """Rows in host memory, page-locked (pinned) when CUDA is available so that moving blocks
    back to the GPU for scoring is asynchronous."""

    def __init__(self, dtype: torch.dtype | None = None, pin_memory: bool | None = None) -> None:
        super().__init__(device="cpu", dtype=dtype)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def _place(self, rows: torch.Tensor) -> torch.Tensor:
        rows = super()._place(rows)
        return rows.pin_memory() if self.pin_memory and not rows.is_pinned() else rows

"""The row index of a :class:`~sketchattr.store.hdf5.DiskStore` checkpoint, held in memory.

Row ``i`` of the checkpoint holds dataset index ``indices[i]`` and is final once ``written[i]``;
:class:`RowIndex` finds the rows of given dataset indices (through a stable argsort of the index)
and the indices whose rows are still to be computed.
"""
from __future__ import annotations

import numpy as np


class RowIndex:
    """``indices`` (int64 ``[N]``): the dataset index of each planned row; ``written`` (bool ``[N]``):
    whether its values are on disk."""

    def __init__(self, indices: np.ndarray, written: np.ndarray) -> None:
        self.indices = indices
        self.written = written
        self.order = np.argsort(indices, kind="stable")

    @property
    def unique(self) -> bool:
        """No dataset index is listed twice."""
        return len(np.unique(self.indices)) == len(self.indices)

    def contains(self, indices: np.ndarray) -> np.ndarray:
        """Whether each of ``indices`` has a row (planned or written)."""
        if len(self.indices) == 0:
            return np.zeros(len(indices), dtype=bool)
        sorted_idx = self.indices[self.order]
        at = np.clip(np.searchsorted(sorted_idx, indices), 0, len(sorted_idx) - 1)
        return sorted_idx[at] == indices

    def positions(self, indices: np.ndarray) -> np.ndarray:
        """The row of each of ``indices`` (all of them must have one)."""
        sorted_idx = self.indices[self.order]
        return self.order[np.searchsorted(sorted_idx, indices)]

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """Those of ``indices`` without a written row, in their order."""
        done = np.zeros(len(indices), dtype=bool)
        has = self.contains(indices)
        done[has] = self.written[self.positions(indices[has])]
        return indices[~done]

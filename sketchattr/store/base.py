"""GradientStore interface and the metadata that makes a store safe to reuse."""
from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch


class StoreMismatchError(ValueError):
    """A store was opened with sketches made by another projector, model, module set or task."""


@dataclass(frozen=True)
class StoreMetadata:
    """What produced a store's rows. Two stores are compatible iff their metadata are equal.

    projector: the projector's ``spec()`` (type, m, seed, ...); modules: names and sizes;
    model_fingerprint: hash of the model's parameters; task: the task's description;
    dim: row width m; kind: ``"train"`` (rows are training-loss gradients).
    """

    projector: dict[str, Any]
    modules: dict[str, Any]
    model_fingerprint: str
    task: str
    dim: int
    kind: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)

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


class GradientStore(abc.ABC):
    """Rows of sketched training gradients [n_train, m] with dataset indices [n_train]."""

    metadata: StoreMetadata | None

    @abc.abstractmethod
    def prepare(self, metadata: StoreMetadata, overwrite: bool = False) -> None:
        """Bind the store to ``metadata``; fail on a mismatch unless ``overwrite``."""

    @abc.abstractmethod
    def append(self, indices: np.ndarray, rows: torch.Tensor) -> None:
        """Add rows [B, m] for dataset indices [B]."""

    @property
    @abc.abstractmethod
    def indices(self) -> np.ndarray:
        """Dataset indices of the stored rows, in row order. [n_train]"""

    @abc.abstractmethod
    def iter_blocks(self, block_rows: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (indices [b], rows [b, m]) blocks in row order."""

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def dim(self) -> int:
        if self.metadata is None:
            raise ValueError("the store is empty and has no metadata yet")
        return self.metadata.dim

    def rows(self) -> torch.Tensor:
        """All rows as one tensor [n_train, m] (for stores that fit in memory)."""
        blocks = [r for _, r in self.iter_blocks(max(len(self), 1))]
        if not blocks:
            raise ValueError("the store holds no rows: featurize a training set first")
        return torch.cat(blocks, dim=0)

    def _check_append(self, indices: np.ndarray, rows: torch.Tensor) -> None:
        if self.metadata is None:
            raise ValueError("call prepare(metadata) before appending rows")
        if rows.ndim != 2 or rows.shape[1] != self.metadata.dim:
            raise ValueError(f"rows must be [B, {self.metadata.dim}], got {tuple(rows.shape)}")
        if len(indices) != rows.shape[0]:
            raise ValueError(f"{len(indices)} indices for {rows.shape[0]} rows")

"""Scorer base class: fit on a store once, then score many query batches."""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch

from sketchattr.score.topk import TopK, top_k
from sketchattr.store import GradientStore


class Scorer(abc.ABC):
    """Base of scorers. Subclasses register under ``name`` via ``class X(Scorer, name="x")``.

    Scores follow the sign convention of DESIGN.md: ``scores[q, i]`` is the predicted change of
    the query's measurement when training example i is up-weighted; shape [n_query, n_train].
    """

    name: ClassVar[str]
    registry: ClassVar[dict[str, type["Scorer"]]] = {}

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            Scorer.registry[name] = cls

    train_indices: np.ndarray

    @abc.abstractmethod
    def fit(self, store: GradientStore) -> "Scorer":
        """Read the store once and prepare to score."""

    @abc.abstractmethod
    def score(self, queries: torch.Tensor) -> torch.Tensor:
        """Scores [n_query, n_train] for query rows [n_query, m]."""

    def top_k(self, queries: torch.Tensor, k: int = 10, **kwargs: Any) -> TopK:
        """Top-k proponents/opponents of each query, by dataset index."""
        return top_k(self.score(queries, **kwargs), self.train_indices, k)

    def _check_fitted(self) -> None:
        if not hasattr(self, "train_indices"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(store) first")

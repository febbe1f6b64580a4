"""Batches as the stages see them: nested tensors (tuples, lists, dicts), datasets, processes.

Shared by the featurizer, the curvature fit, the distributed runner and the commands, so each
stage reads a batch the same way: :func:`tree_map` over its tensors, :func:`batch_len`,
:func:`first_example`, :func:`as_dataset` (a tuple of tensors as a ``TensorDataset``),
:func:`dataset_length` with clear errors, :func:`process_rank` and :func:`main_process` (rank 0 or no
process group).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

__all__ = ["as_dataset", "batch_len", "dataset_length", "first_example", "main_process", "process_rank", "tree_map"]


def tree_map(fn: Callable[[Any], Any], obj: Any) -> Any:
    """``fn`` applied to every tensor of a batch (tensors, lists, tuples, dicts nested)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    return obj


def as_dataset(data: Any) -> Dataset:
    """A tuple/list of tensors as a TensorDataset (their first dimensions must agree); else ``data``."""
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        lengths = [t.shape[0] if t.dim() else None for t in data]
        if None in lengths or len(set(lengths)) != 1:
            raise ValueError(f"a tuple of tensors is read as (inputs, labels, ...) with one row per example; their "
                             f"first dimensions must agree, found shapes {[tuple(t.shape) for t in data]}")
        return torch.utils.data.TensorDataset(*data)
    return data


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised torch.distributed job, ``(0, 1)`` otherwise."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main_process() -> bool:
    """False on the ranks > 0 of an initialised torch.distributed job (they show no progress bars)."""
    return process_rank()[0] == 0


def dataset_length(dataset: Any, what: str = "dataset") -> int:
    """len(dataset), with clear errors for an unsized or empty dataset."""
    try:
        n = len(dataset)
    except TypeError as exc:
        raise TypeError(f"{what} must be a map-style torch Dataset (with __len__) or a tuple of tensors") from exc
    if n == 0:
        raise ValueError(f"the {what} is empty")
    return n


def first_example(batch: Any) -> Any:
    """The batch's first example, as a batch of one."""
    return tree_map(lambda t: t[:1], batch)


def batch_len(batch: Any) -> int:
    """Examples in a batch (the leading dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    return batch_len(batch[0])

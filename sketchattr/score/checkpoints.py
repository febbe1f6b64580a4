"""One featurizer and one store per checkpoint of a training run (TracIn and SOURCE read them).

Every checkpoint gets the same modules, projector spec and seed, and the same (seeded) sampler,
so every store holds the same training rows in the same order: the scorers add them row by row.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from sketchattr.featurize.featurizer import Featurizer
from sketchattr.store import GradientStore

__all__ = ["featurize_checkpoints"]

STORES = ("none", "memory", "cpu", "disk")


def featurize_checkpoints(
    models: Sequence[torch.nn.Module],
    task: Any,
    train_dataset: Any,
    *,
    projector: Any = "identity",
    m: int | None = None,
    seed: int = 0,
    modules: Any = None,
    sampler: Any = None,
    store: str = "none",
    path: Any = None,
    default_path: str = "grad_cache/checkpoints.h5",
    batch_size: int = 64,
    collate_fn: Any = None,
    device: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[list[Featurizer], list[GradientStore]]:
    """(featurizers, stores), one each per model in ``models`` (in training order).

    projector: one spec for every model, or a list with one per model (e.g. each checkpoint's own
    sparse eigenbasis).

    store: ``"none"`` (memory), ``"cpu"`` or ``"disk"``: ``path`` (default ``default_path``) is one
    HDF5 file with one group ``ckpt<c>`` per checkpoint; re-running resumes each group.
    """
    models = list(models)
    if not models:
        raise ValueError("give at least one checkpoint model")
    if store not in STORES:
        raise ValueError(f"store must be 'none', 'cpu' or 'disk', got {store!r}")
    projectors = list(projector) if isinstance(projector, (list, tuple)) else [projector] * len(models)
    if len(projectors) != len(models):
        raise ValueError(f"{len(projectors)} projectors for {len(models)} models: give one for all, or one per model")
    featurizers, stores = [], []
    for c, model in enumerate(models):
        feat = Featurizer(model, task, modules=modules, projector=projectors[c], m=m, seed=seed, batch_size=batch_size,
                          collate_fn=collate_fn, device=device, progress=progress)
        kwargs: dict[str, Any] = {}
        if store == "disk":
            kwargs = {"path": path if path is not None else default_path, "checkpoint": f"ckpt{c}"}
        featurizers.append(feat)
        stores.append(feat.featurize(train_dataset, store=store, sampler=sampler, overwrite=overwrite, **kwargs))
    return featurizers, stores

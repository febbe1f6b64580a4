"""Integrations with training frameworks and peers' task definitions.

* :class:`~sketchattr.integrations.kronfluence.KronfluenceTask`: a Kronfluence ``Task``, unchanged,
  as a sketchattr Task (same sign and modules as Kronfluence; kronfluence is never imported).
* :class:`SketchCallback` (``sketchattr.integrations.hf_trainer``): a Hugging Face ``Trainer``
  callback that builds a store while training. Imported on first use, so ``import
  sketchattr.integrations`` never imports transformers.
* :class:`IndexedDataset`, :class:`TrainTimeSketcher`: the framework-free pieces
  (:mod:`sketchattr.featurize.train_time`), for custom loops.

May import :mod:`sketchattr.validate` and below; transformers only inside :mod:`.hf_trainer`.
"""
from __future__ import annotations

from typing import Any

from sketchattr.featurize.train_time import IndexedDataset, TrainTimeSketcher

__all__ = ["IndexedDataset", "SketchCallback", "TrainTimeSketcher"]


def __getattr__(name: str) -> Any:
    if name == "SketchCallback":
        from sketchattr.integrations.hf_trainer import SketchCallback

        return SketchCallback
    raise AttributeError(f"module 'sketchattr.integrations' has no attribute {name!r}")

"""Per-example gradients of the training loss (train rows) or measurement (query rows).

:class:`Featurizer` picks the modules (:mod:`.selection`), drives the hook engine (:mod:`.engine`:
its plan in :mod:`.plan`, per-batch results in :mod:`.capture`, layer rules in :mod:`.rules`) or
the ``torch.func.vmap`` fallback (:mod:`.vmap`), hands each batch to a projector and writes the
rows into a store; :class:`TrainTimeSketcher` does the same from a training step's own forward
and backward. Also the model fingerprint and the Adam preconditioner (LESS).

May import :mod:`sketchattr.store`, :mod:`sketchattr.project`, :mod:`sketchattr.sample`,
:mod:`sketchattr.task`, :mod:`sketchattr.data` and :mod:`sketchattr.core`.
"""
from sketchattr.featurize.capture import BatchCapture, HookMismatchError
from sketchattr.featurize.engine import HookEngine
from sketchattr.featurize.featurizer import Featurizer
from sketchattr.featurize.fingerprint import model_fingerprint
from sketchattr.featurize.outcome import FeaturizeRun, NonFiniteGradientError
from sketchattr.featurize.plan import Block
from sketchattr.featurize.rules import LayerRule, UnsupportedModuleError
from sketchattr.featurize.train_time import IndexedDataset, TrainTimeSketcher
from sketchattr.featurize.vmap import VmapError

__all__ = [
    "BatchCapture", "Block", "FeaturizeRun", "Featurizer", "HookEngine", "HookMismatchError", "LayerRule",
    "IndexedDataset", "NonFiniteGradientError", "TrainTimeSketcher", "UnsupportedModuleError", "VmapError", "model_fingerprint",
]

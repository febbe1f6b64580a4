"""Per-example gradients of the training loss (train rows) or measurement (query rows).

:class:`Featurizer` drives the hook engine (:mod:`.engine`, layer rules in :mod:`.rules`) or the
``torch.func.vmap`` fallback, and hands the gradients to a projector.
"""
from sketchattr.featurize.engine import BatchCapture, Block, HookEngine, HookMismatchError
from sketchattr.featurize.featurizer import FeaturizeRun, Featurizer, NonFiniteGradientError, VmapError
from sketchattr.featurize.fingerprint import model_fingerprint
from sketchattr.featurize.rules import LayerRule, UnsupportedModuleError
from sketchattr.featurize.train_time import IndexedDataset, TrainTimeSketcher

__all__ = [
    "BatchCapture", "Block", "FeaturizeRun", "Featurizer", "HookEngine", "HookMismatchError", "LayerRule",
    "IndexedDataset", "NonFiniteGradientError", "TrainTimeSketcher", "UnsupportedModuleError", "VmapError", "model_fingerprint",
]

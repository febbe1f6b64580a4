"""Curvature for EKFAC, KFAC and diagonal influence.

:func:`fit_factors` runs the hook engine over the training data and estimates the Kronecker
factors, their eigenbases and the EKFAC correction (or the diagonal Fisher), stage by stage,
saved and resumable (:mod:`.factors`; the data passes in :mod:`.passes`, the stage files in
:mod:`.stages`); :func:`module_damping` is the family's damping per module
(:mod:`.damping`); :class:`EigenbasisProjector` and :class:`SparseEigenbasisProjector` sketch
rows in the fitted eigenbases (:mod:`.eigenbasis`); :class:`GGNProducts` multiplies vectors by the exact
Gauss-Newton matrix over the training set (:mod:`.ggn`). The scorers that use them are in
:mod:`sketchattr.score.ekfac`.

May import :mod:`sketchattr.distributed` (collectives), :mod:`sketchattr.featurize` and below.
"""
from sketchattr.core.profiler import Profiler
from sketchattr.curvature.column_budget import SparseWidth, sparse_width
from sketchattr.curvature.damping import module_damping
from sketchattr.curvature.eigenbasis import EigenbasisProjector, SparseEigenbasisProjector
from sketchattr.curvature.factors import Factors, fit_factors
from sketchattr.curvature.ggn import GGNProducts
from sketchattr.curvature.stages import STAGES, FactorsMismatchError
from sketchattr.featurize.rules import UnsupportedModuleError

__all__ = ["EigenbasisProjector", "Factors", "FactorsMismatchError", "GGNProducts", "Profiler", "STAGES", "SparseEigenbasisProjector",
           "SparseWidth", "UnsupportedModuleError", "fit_factors", "module_damping", "sparse_width"]

"""Curvature for EKFAC, KFAC and diagonal influence.

:func:`fit_factors` runs the hook engine (:mod:`sketchattr.featurize.engine`) over the training
data, estimates the Kronecker factors, their eigenbases and the EKFAC correction (or the
diagonal Fisher), stage by stage, saved and resumable (:mod:`.factors`); :class:`Profiler` times
the stages. The scorers that use them on a sketched store are in :mod:`sketchattr.score.ekfac`.
"""
from sketchattr.curvature.damping import module_damping
from sketchattr.curvature.eigenbasis import EigenbasisProjector, SparseEigenbasisProjector
from sketchattr.curvature.factors import STAGES, Factors, FactorsMismatchError, fit_factors
from sketchattr.core.profiler import Profiler
from sketchattr.featurize.rules import UnsupportedModuleError

__all__ = ["EigenbasisProjector", "Factors", "FactorsMismatchError", "Profiler", "STAGES", "SparseEigenbasisProjector",
           "UnsupportedModuleError", "fit_factors", "module_damping"]

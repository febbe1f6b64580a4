"""Curvature of Linear/Conv2d modules for EKFAC, KFAC and diagonal influence.

:func:`fit_factors` runs hooks over the training data (:mod:`.capture`), estimates the
Kronecker factors, their eigenbases and the EKFAC correction (or the diagonal Fisher), stage by
stage, saved and resumable (:mod:`.factors`); :class:`Profiler` times the stages. The scorers
that use them on a sketched store are in :mod:`sketchattr.score.ekfac`.
"""
from sketchattr.curvature.capture import LayerCapture, LayerSpec, UnsupportedModuleError, layer_specs, per_example_gradients
from sketchattr.curvature.factors import STAGES, Factors, FactorsMismatchError, fit_factors
from sketchattr.curvature.profiler import Profiler

__all__ = [
    "Factors", "FactorsMismatchError", "LayerCapture", "LayerSpec", "Profiler", "STAGES",
    "UnsupportedModuleError", "fit_factors", "layer_specs", "per_example_gradients",
]

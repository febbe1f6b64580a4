"""Validation: is the attribution right, and is the sketch big enough?

LDS against retraining ground truth (:func:`subset_ground_truth`, a cached, resumable harness
for any ``train_fn`` / ``measure_fn``), leave-one-out, the retraining noise ceiling of LDS (:func:`lds_noise_ceiling`), and the (1 ± ε) spectrum bound of a sketch
with d_λ and a recommended m. May import :mod:`sketchattr.score` and below; the bench models and
their ground truth are in :mod:`sketchattr.bench`."""
from sketchattr.task import margin
from sketchattr.validate.ceiling import NoiseCeiling, lds_noise_ceiling
from sketchattr.validate.ground_truth import GroundTruth, subset_ground_truth, subset_positions
from sketchattr.validate.lds import LDSResult, lds, subsets_to_mask
from sketchattr.validate.loo import LOOGroundTruth, loo_correlation, loo_ground_truth
from sketchattr.validate.spectrum import SpectrumCheck, exact_effective_dimension, recommend_sketch_size, spectrum_check

__all__ = [
    "GroundTruth", "LDSResult", "lds", "lds_noise_ceiling", "NoiseCeiling", "margin", "subset_ground_truth",
    "subset_positions", "subsets_to_mask", "LOOGroundTruth", "loo_correlation", "loo_ground_truth",
    "SpectrumCheck", "exact_effective_dimension", "recommend_sketch_size", "spectrum_check",
]

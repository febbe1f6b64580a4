"""Validation: linear datamodeling score and counterfactual ground truth."""
from sketchattr.recipes import margin
from sketchattr.validate.ground_truth import GroundTruth, digits_ground_truth, subset_ground_truth, subset_positions
from sketchattr.validate.lds import LDSResult, lds, subsets_to_mask
from sketchattr.validate.loo import LOOGroundTruth, loo_correlation, loo_ground_truth
from sketchattr.validate.spectrum import SpectrumCheck, exact_effective_dimension, recommend_sketch_size, spectrum_check

__all__ = [
    "GroundTruth", "LDSResult", "digits_ground_truth", "lds", "margin", "subset_ground_truth",
    "subset_positions", "subsets_to_mask", "LOOGroundTruth", "loo_correlation", "loo_ground_truth",
    "SpectrumCheck", "exact_effective_dimension", "recommend_sketch_size", "spectrum_check",
]

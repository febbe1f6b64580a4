"""Per-example gradients of the training loss (train rows) or measurement (query rows)."""
from sketchattr.featurize.featurizer import FeaturizeRun, Featurizer, NonFiniteGradientError
from sketchattr.featurize.fingerprint import model_fingerprint

__all__ = ["FeaturizeRun", "Featurizer", "NonFiniteGradientError", "model_fingerprint"]

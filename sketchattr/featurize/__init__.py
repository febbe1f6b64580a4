"""Per-example gradients of the training loss (train rows) or measurement (query rows)."""
from sketchattr.featurize.featurizer import Featurizer, NonFiniteGradientError
from sketchattr.featurize.fingerprint import model_fingerprint

__all__ = ["Featurizer", "NonFiniteGradientError", "model_fingerprint"]

"""The benches' datasets, read from packages or local paths only (nothing is downloaded).

digits (bundled with scikit-learn), MNIST (idx files or ``mnist.pkl.gz``), CIFAR-2 (python
pickles, through :mod:`sketchattr.data.safe_pickle`), MAESTRO tokens, generated Markov-chain
text and lazily seeded random tokens; :func:`load_dataset` picks one by name.

Part of the bench zoo (:mod:`sketchattr.bench`): may import every stage.
"""
from sketchattr.bench.data.digits import DigitsSplit, load_digits_split
from sketchattr.bench.data.registry import DatasetSplit, available_datasets, load_dataset, subsample_index

__all__ = ["DatasetSplit", "DigitsSplit", "available_datasets", "load_dataset", "load_digits_split", "subsample_index"]

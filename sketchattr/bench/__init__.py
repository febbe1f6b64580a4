"""The bench zoo: datasets, models, training recipes and retraining ground truth of the benches.

What the benchmarks, experiments, examples and tests attribute, and what the quick start trains:

* :mod:`sketchattr.bench.data` — digits, MNIST, CIFAR-2, MAESTRO, Markov-chain text, random tokens;
* :mod:`sketchattr.bench.models` — MLP, logistic regression, ResNet-9, ResNet-50, GPT presets,
  Music Transformer;
* :mod:`sketchattr.bench.recipes` — reference training of each bench model (``train_digits_mlp``,
  ``train_checkpoints``, ``train_markov_lm``, ...); :mod:`sketchattr.bench.train` — default recipes
  by dataset and model name;
* :mod:`sketchattr.bench.ground_truth` — the benches' cached LDS ground truth.

The top of the stack: may import every stage (it never is imported by one).
"""
from sketchattr.bench.data.digits import DigitsSplit, load_digits_split
from sketchattr.bench.recipes import train_checkpoints, train_digits_mlp

__all__ = ["DigitsSplit", "load_digits_split", "train_checkpoints", "train_digits_mlp"]

"""Train-set samplers: which training rows get featurized, with importance weights.

>>> from sketchattr.sample import make_sampler, dataset_labels
>>> s = make_sampler("uniform", rate=0.1, seed=0).sample(len(train))
>>> s.indices, s.weights, s.spec          # int64 [k] sorted, float64 [k], JSON-able dict
>>> make_sampler("stratified", key="labels", rate=0.1).sample(n, keys=dataset_labels(train))

Types: ``all`` (aliases ``none``, ``full``; ``kind=None``), ``uniform`` (``random``,
``subsample``), ``stratified`` (``stratify``), ``weighted`` (``pps``, ``importance``).
``sum_j weights[j] * x[indices[j]]`` is an unbiased estimate of ``sum_i x[i]`` over the
train set.  Same seed -> same sample.

May import :mod:`sketchattr.core` only.
"""
from sketchattr.sample.base import Sample, Sampler, dataset_labels, make_sampler, sample_from_spec
from sketchattr.sample.samplers import (
    AllSampler,
    StratifiedSampler,
    UniformSampler,
    WeightedSampler,
    inclusion_probabilities,
    stratum_codes,
)

__all__ = [
    "Sample",
    "Sampler",
    "AllSampler",
    "UniformSampler",
    "StratifiedSampler",
    "WeightedSampler",
    "make_sampler",
    "sample_from_spec",
    "dataset_labels",
    "inclusion_probabilities",
    "stratum_codes",
]

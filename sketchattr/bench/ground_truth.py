"""Cached retraining ground truth of the benches (digits MLP/CNN, MNIST MLP, the Markov-chain
transformer), built with the generic harness :func:`sketchattr.validate.subset_ground_truth`."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable

from sketchattr.bench.data.digits import N_TRAIN, load_digits_split
from sketchattr.bench.data.markov import markov_text
from sketchattr.bench.data.prose import prose_text
from sketchattr.bench.recipes import (
    MNIST_BENCH_TRAIN,
    load_mnist_bench,
    query_margins,
    sequence_log_likelihoods,
    train_digits_cnn,
    train_digits_mlp,
    train_markov_lm,
    train_mnist_mlp,
)
from sketchattr.validate.ground_truth import GroundTruth, MeasureFn, TrainFn, subset_ground_truth

__all__ = ["LM_BENCHES", "bench_ground_truth", "digits_ground_truth", "lm_ground_truth", "markov_lm_ground_truth",
           "mnist_mlp_ground_truth"]


def bench_ground_truth(stem: str, train_fn: TrainFn, measure_fn: MeasureFn, n_train: int, attrs: dict, cache_dir,
                        n_subsets: int, alpha: float, n_seeds: int, seed: int, progress: bool, workers: int | None,
                        suffix: str = "") -> GroundTruth:
    """A bench's cached ground truth at ``cache_dir/{stem}_lds_K{K}_a{alpha}_R{n_seeds}_s{seed}{suffix}.h5``;
    ``workers`` None = ``min(2, os.cpu_count())``."""
    path = Path(cache_dir) / f"{stem}_lds_K{n_subsets}_a{alpha}_R{n_seeds}_s{seed}{suffix}.h5"
    return subset_ground_truth(
        path, train_fn, measure_fn, n_train=n_train, n_subsets=n_subsets, alpha=alpha, n_seeds=n_seeds, seed=seed,
        attrs=attrs, progress=progress, workers=min(2, os.cpu_count() or 1) if workers is None else workers,
    )


def digits_ground_truth(
    cache_dir: str | os.PathLike = "grad_cache",
    n_subsets: int = 100,
    alpha: float = 0.5,
    n_seeds: int = 2,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    model: str = "mlp",
) -> GroundTruth:
    """Digits ground truth: query margins [K, 100] of ``train_digits_mlp`` (``model="mlp"``, the
    digits-mlp bench) or ``train_digits_cnn`` (``model="cnn"``) on half-size subsets.

    Cached at ``cache_dir/digits_lds_K{K}_a{alpha}_R{n_seeds}_s{seed}.h5`` (the CNN's file has ``digits_cnn_``).
    ``workers`` defaults to ``min(2, os.cpu_count())`` processes.
    """
    trainers = {"mlp": train_digits_mlp, "cnn": train_digits_cnn}
    if model not in trainers:
        raise ValueError(f"model must be one of {sorted(trainers)}, got {model!r}")
    split = load_digits_split()
    return bench_ground_truth(
        "digits" if model == "mlp" else f"digits_{model}", partial(trainers[model], split=split),
        partial(query_margins, split=split), N_TRAIN, {"bench": f"digits-{model}", "measure": "query margin"},
        cache_dir, n_subsets, alpha, n_seeds, seed, progress, workers,
    )


def mnist_mlp_ground_truth(
    cache_dir: str | os.PathLike = "grad_cache",
    n_subsets: int = 100,
    alpha: float = 0.5,
    n_seeds: int = 2,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    data_dir: str | None = None,
) -> GroundTruth:
    """MNIST-MLP bench ground truth (:func:`sketchattr.bench.recipes.load_mnist_bench`): query margins [K, 100]
    of ``train_mnist_mlp`` on half-size subsets of the 3,000 train rows. Cached at
    ``cache_dir/mnist_mlp_lds_K{K}_a{alpha}_R{n_seeds}_s{seed}.h5`` (~2 min on 2 cores the first time)."""
    split = load_mnist_bench(data_dir)
    return bench_ground_truth(
        "mnist_mlp", partial(train_mnist_mlp, split=split), partial(query_margins, split=split), MNIST_BENCH_TRAIN,
        {"bench": "mnist-mlp", "measure": "query margin"}, cache_dir, n_subsets, alpha, n_seeds, seed, progress, workers,
    )


LM_BENCHES: dict[str, Callable[[], object]] = {
    "markov": markov_text,
    "markov-wide": partial(markov_text, vocab=96, n_chains=6, lengths=(12, 32), branching=6, seed=7),
    "prose": prose_text,
}
"""The language-model benches: their train and query sequences (``.train``, ``.queries``, ``.vocab``).
``markov``: four sparse chains over 64 tokens, 16–24 tokens per sequence; ``markov-wide``: six
denser chains (six successors per token) over 96 tokens, 12–32 per sequence; ``prose``: scikit-learn's
dataset descriptions as characters (:mod:`sketchattr.bench.data.prose`). The same tiny GPT-2 and
recipe (:func:`~sketchattr.bench.recipes.train_markov_lm`) for each."""


def lm_ground_truth(
    bench: str = "markov",
    cache_dir: str | os.PathLike = "grad_cache",
    n_subsets: int = 100,
    alpha: float = 0.5,
    n_seeds: int = 2,
    seed: int = 0,
    epochs: int = 8,
    progress: bool = True,
    workers: int | None = None,
) -> GroundTruth:
    """A language-model bench's ground truth: the query log-likelihoods [K, n_query] of
    ``train_markov_lm`` retrained on half-size subsets of the bench's train sequences (:data:`LM_BENCHES`).
    Cached at ``cache_dir/<stem>_lds_K{K}_a{alpha}_R{n_seeds}_s{seed}_e{epochs}.h5`` (stem ``markov_lm``
    for ``markov``, ``lm_<bench>`` otherwise)."""
    if bench not in LM_BENCHES:
        raise ValueError(f"bench must be one of {sorted(LM_BENCHES)}, got {bench!r}")
    text = LM_BENCHES[bench]()

    def measure(model):
        return sequence_log_likelihoods(model, text.queries)

    stem = "markov_lm" if bench == "markov" else f"lm_{bench}"
    return bench_ground_truth(
        stem, partial(train_markov_lm, text=text, epochs=epochs), measure, len(text.train),
        {"bench": f"{bench}-lm", "measure": "query log-likelihood", "epochs": epochs},
        cache_dir, n_subsets, alpha, n_seeds, seed, progress, workers, suffix=f"_e{epochs}",
    )


def markov_lm_ground_truth(cache_dir: str | os.PathLike = "grad_cache", **kwargs) -> GroundTruth:
    """The transformer bench's ground truth (:func:`lm_ground_truth` of ``markov``)."""
    return lm_ground_truth("markov", cache_dir, **kwargs)

"""One entry point for the experiment datasets: ``load_dataset(name, data_dir, ...)`` -> :class:`DatasetSplit`.

| name | source (local files only, never downloaded) | train / test TensorDataset | input_shape |
| --- | --- | --- | --- |
| ``digits`` | bundled sklearn digits bench split (``data_dir`` ignored) | (x float32 [N, 64], y int64) — 1000 train rows, the 100 queries as test | (64,) |
| ``mnist`` | idx files, see :mod:`sketchattr.bench.data.mnist` | (x float32 [N, 1, 28, 28] in [0, 1], y int64) | (1, 28, 28) |
| ``cifar2`` | CIFAR-10 python batches, see :mod:`sketchattr.bench.data.cifar` | (x float32 [N, 3, 32, 32] normalised, y int64 in {0, 1}) | (3, 32, 32) |
| ``maestro`` | token arrays, see :mod:`sketchattr.bench.data.maestro` | (tokens int64 [N, T],) — one tensor, no labels | (T,) |

Subsampling: with ``n_train`` (``n_test``) the rows are ``sort(RandomState(seed).permutation(N)[:n])``
(a fresh ``RandomState(seed)`` for each of train and test), kept in file order; ``train_index`` /
``test_index`` hold the chosen rows' positions in the full train / test set (file order; for digits:
positions into the 1000 bench train rows / 100 queries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from sketchattr.bench.data.cifar import cifar_tensors, read_cifar10, select_classes
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.data.maestro import read_maestro
from sketchattr.bench.data.mnist import mnist_tensors, read_mnist


@dataclass(frozen=True, eq=False)
class DatasetSplit:
    """A train / test pair of TensorDatasets with what a model constructor needs.

    Classification: ``train.tensors == (x [N, *input_shape], y int64 [N])`` and ``num_classes`` set.
    Language modelling (maestro): ``train.tensors == (tokens int64 [N, T],)``, ``num_classes=None``,
    ``vocab_size`` set, ``input_shape == (T,)``.
    """
    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int | None
    input_shape: tuple[int, ...]
    vocab_size: int | None = None
    train_index: np.ndarray | None = None
    test_index: np.ndarray | None = None

    @property
    def is_lm(self) -> bool:
        """True for token datasets (no labels)."""
        return self.num_classes is None


def subsample_index(n_total: int, n: int | None, seed: int, what: str = "rows") -> np.ndarray:
    """Sorted positions of ``n`` rows out of ``n_total`` (all rows when ``n`` is None)."""
    if n is None:
        return np.arange(n_total)
    if not 1 <= n <= n_total:
        raise ValueError(f"{what}: asked for {n} rows but only {n_total} are available")
    return np.sort(np.random.RandomState(seed).permutation(n_total)[:n])


def _digits(data_dir: str | None, n_train: int | None, n_test: int | None, seed: int) -> DatasetSplit:

    s = load_digits_split()
    tr = subsample_index(len(s.x_train), n_train, seed, "digits train")
    te = subsample_index(len(s.x_query), n_test, seed, "digits test")
    return DatasetSplit(
        "digits", TensorDataset(s.x_train[tr], s.y_train[tr]), TensorDataset(s.x_query[te], s.y_query[te]),
        num_classes=10, input_shape=(64,), train_index=tr, test_index=te,
    )


def _mnist(data_dir: str | None, n_train: int | None, n_test: int | None, seed: int) -> DatasetSplit:

    xi, yi, xt, yt = read_mnist(data_dir)
    tr = subsample_index(len(xi), n_train, seed, "mnist train")
    te = subsample_index(len(xt), n_test, seed, "mnist test")
    x_tr, y_tr = mnist_tensors(xi[tr], yi[tr])
    x_te, y_te = mnist_tensors(xt[te], yt[te])
    return DatasetSplit("mnist", TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), num_classes=10,
                        input_shape=tuple(x_tr.shape[1:]), train_index=tr, test_index=te)


def _cifar2(data_dir: str | None, n_train: int | None, n_test: int | None, seed: int,
            classes: tuple[int, int] = (3, 5)) -> DatasetSplit:
    """CIFAR-10 classes ``classes`` relabelled 0/1; ``train_index`` counts rows within those classes."""
    xi, yi, xt, yt = read_cifar10(data_dir)
    if len(classes) != 2:
        raise ValueError(f"cifar2 needs exactly two classes, got {classes}")
    xi, yi = select_classes(xi, yi, classes)
    xt, yt = select_classes(xt, yt, classes)
    if len(xi) == 0 or len(xt) == 0:
        raise ValueError(f"cifar2: no rows of classes {tuple(classes)} in the train or test batches")
    tr = subsample_index(len(xi), n_train, seed, "cifar2 train")
    te = subsample_index(len(xt), n_test, seed, "cifar2 test")
    x_tr, y_tr = cifar_tensors(xi[tr], yi[tr])
    x_te, y_te = cifar_tensors(xt[te], yt[te])
    return DatasetSplit("cifar2", TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), num_classes=2,
                        input_shape=(3, 32, 32), train_index=tr, test_index=te)


def _maestro(data_dir: str | None, n_train: int | None, n_test: int | None, seed: int,
             seq_len: int = 64, vocab_size: int | None = None) -> DatasetSplit:

    train, test, vocab = read_maestro(data_dir, seq_len=seq_len, vocab_size=vocab_size)
    tr = subsample_index(len(train), n_train, seed, "maestro train")
    te = subsample_index(len(test), n_test, seed, "maestro test")
    return DatasetSplit("maestro", TensorDataset(torch.from_numpy(train[tr])), TensorDataset(torch.from_numpy(test[te])),
                        num_classes=None, input_shape=(train.shape[1],), vocab_size=vocab, train_index=tr, test_index=te)


_LOADERS: dict[str, Callable[..., DatasetSplit]] = {
    "digits": _digits, "mnist": _mnist, "cifar2": _cifar2, "maestro": _maestro,
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_LOADERS)


def load_dataset(name: str, data_dir: str | None = None, n_train: int | None = None, n_test: int | None = None,
                 seed: int = 0, **kwargs: Any) -> DatasetSplit:
    """Load dataset ``name`` from local files in ``data_dir`` (see the module table).

    kwargs: ``classes=(3, 5)`` for cifar2; ``seq_len=64`` (windows of variable-length sequences) and
    ``vocab_size`` for maestro. Missing files raise FileNotFoundError naming the expected files.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {available_datasets()}")
    return _LOADERS[name](None if data_dir is None else str(data_dir), n_train, n_test, seed, **kwargs)

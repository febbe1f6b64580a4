"""CIFAR-2 (two CIFAR-10 classes, default cat vs dog) from the CIFAR-10 *python* version (local only).

Expected files in ``data_dir`` or ``data_dir/cifar-10-batches-py``: ``data_batch_1`` .. ``data_batch_5``
and ``test_batch``, each a pickle (load with ``encoding="bytes"``) of a dict with ``b"data"``: uint8
[N, 3072] (1024 red, 1024 green, 1024 blue values of a 32×32 image, row-major) and ``b"labels"``: N ints
in 0..9. Pickles run code when loaded: only point this at files you trust.

Normalisation: x = (pixel/255 − mean) / std per channel with the CIFAR-10 training-set statistics
``CIFAR_MEAN = (0.4914, 0.4822, 0.4465)``, ``CIFAR_STD = (0.2470, 0.2435, 0.2616)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sketchattr.data.safe_pickle import safe_load

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FORMAT_HINT = (
    "the CIFAR-10 python version: " + ", ".join(TRAIN_BATCHES + (TEST_BATCH,))
    + " (pickled dicts with b'data' uint8 [N, 3072] and b'labels'), in data_dir or data_dir/cifar-10-batches-py"
)


class CifarFormatError(ValueError):
    """A CIFAR batch file does not have the expected content."""


def find_cifar_dir(data_dir: str | Path | None) -> Path:
    """The folder holding all six batch files; FileNotFoundError names what is missing."""
    if data_dir is None:
        raise FileNotFoundError(f"cifar2 needs data_dir: a folder with {FORMAT_HINT}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"cifar2 data_dir {str(root)!r} does not exist; expected {FORMAT_HINT}")
    names = TRAIN_BATCHES + (TEST_BATCH,)
    best: list[str] = list(names)
    for folder in (root, root / "cifar-10-batches-py"):
        missing = [n for n in names if not (folder / n).is_file()]
        if not missing:
            return folder
        best = min(best, missing, key=len)
    raise FileNotFoundError(f"cifar2: missing {best} in {str(root)!r}; expected {FORMAT_HINT}")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> data uint8 [N, 3072], labels int64 [N]."""
    with open(path, "rb") as f:  # restricted: a crafted batch file cannot run code
        d = safe_load(f, path, encoding="bytes")
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise CifarFormatError(f"{path}: expected a pickled dict with keys b'data' and b'labels'")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CifarFormatError(f"{path}: b'data' must be uint8 [N, 3072]; found {data.dtype} {data.shape}")
    if len(labels) != len(data):
        raise CifarFormatError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CifarFormatError(f"{path}: labels must lie in 0..9")
    return data, labels


def read_cifar10(data_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All of CIFAR-10: train uint8 [N, 3072], labels [N], test [M, 3072], labels [M] (file order)."""
    folder = find_cifar_dir(data_dir)
    parts = [read_cifar_batch(folder / n) for n in TRAIN_BATCHES]
    x_test, y_test = read_cifar_batch(folder / TEST_BATCH)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test


def select_classes(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keep rows whose label is in ``classes`` (file order) and relabel ``classes[k]`` -> k."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not all(0 <= c <= 9 for c in classes):
        raise ValueError(f"classes must be distinct CIFAR-10 labels in 0..9, got {classes}")
    keep = np.isin(y, classes)
    lut = np.full(10, -1, dtype=np.int64)
    lut[classes] = np.arange(len(classes))
    return x[keep], lut[y[keep]]


def cifar_tensors(data: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3072], [N] -> x float32 [N, 3, 32, 32] normalised per channel, y int64 [N]."""
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    mean = np.asarray(CIFAR_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy((x - mean) / std), torch.from_numpy(labels.astype(np.int64))

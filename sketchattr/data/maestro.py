"""MAESTRO as token arrays (MIDI-derived event tokens, e.g. a REMI / MIDI-like vocabulary), local only.

This package does not tokenize MIDI: convert the MAESTRO performances once with your tokenizer and
save the tokens in ``data_dir`` in one of these formats:

* ``maestro_tokens.npz`` with arrays ``train`` and ``test`` and optionally a scalar ``vocab_size``;
* ``train.npy`` and ``test.npy``.

Each ``train`` / ``test`` array is either an integer array [N, T] (N windows of T tokens, used as is)
or a 1-D object array of variable-length 1-D integer sequences (one per performance), which is cut into
non-overlapping windows of ``seq_len`` tokens (a shorter tail is dropped). Object arrays are pickles
(``allow_pickle=True``): only load files you trust. Tokens must be integers >= 0; ``vocab_size``
defaults to the npz's ``vocab_size`` or else max token + 1 (over train and test).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

NPZ_NAME = "maestro_tokens.npz"
NPY_NAMES = ("train.npy", "test.npy")
DEFAULT_SEQ_LEN = 64
FORMAT_HINT = (
    f"'{NPZ_NAME}' (arrays 'train', 'test', optional 'vocab_size') or '{NPY_NAMES[0]}' + '{NPY_NAMES[1]}', "
    "each an int array [N, T] of event tokens or an object array of 1-D token sequences"
)


class TokenFormatError(ValueError):
    """A token array has the wrong type, shape or values."""


def token_windows(seqs: np.ndarray, seq_len: int = DEFAULT_SEQ_LEN, what: str = "tokens") -> np.ndarray:
    """[N, T] int array -> int64 as is; object array of 1-D sequences -> int64 [W, seq_len] windows."""
    arr = np.asarray(seqs)
    if arr.dtype != object:
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise TokenFormatError(f"{what}: expected an integer array [N, T]; found {arr.dtype} {arr.shape}")
        return arr.astype(np.int64)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    windows = []
    for k, s in enumerate(arr.reshape(-1)):
        s = np.asarray(s)
        if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer):
            raise TokenFormatError(f"{what}[{k}]: expected a 1-D integer token sequence; found {s.dtype} {s.shape}")
        n = len(s) // seq_len
        if n:
            windows.append(s[: n * seq_len].reshape(n, seq_len).astype(np.int64))
    if not windows:
        raise TokenFormatError(f"{what}: no sequence holds seq_len={seq_len} tokens")
    return np.concatenate(windows)


def read_maestro(data_dir: str | Path | None, seq_len: int = DEFAULT_SEQ_LEN,
                 vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """-> train int64 [N, T], test int64 [M, T], vocab_size. FileNotFoundError names the expected files."""
    if data_dir is None:
        raise FileNotFoundError(f"maestro needs data_dir: a folder with {FORMAT_HINT}")
    root = Path(data_dir)
    npz, npys = root / NPZ_NAME, [root / n for n in NPY_NAMES]
    stored_vocab = None
    if npz.is_file():
        with np.load(npz, allow_pickle=True) as f:
            missing = [k for k in ("train", "test") if k not in f.files]
            if missing:
                raise TokenFormatError(f"{npz}: missing array(s) {missing}; expected {FORMAT_HINT}")
            raw_train, raw_test = f["train"], f["test"]
            if "vocab_size" in f.files:
                stored_vocab = int(np.asarray(f["vocab_size"]).reshape(()))
    elif all(p.is_file() for p in npys):
        raw_train, raw_test = (np.load(p, allow_pickle=True) for p in npys)
    else:
        raise FileNotFoundError(f"maestro: found neither {NPZ_NAME} nor both of {list(NPY_NAMES)} in {str(root)!r}; expected {FORMAT_HINT}")
    train = token_windows(raw_train, seq_len, "train")
    test = token_windows(raw_test, seq_len, "test")
    if train.shape[1] != test.shape[1]:
        raise TokenFormatError(f"train and test windows differ in length: {train.shape[1]} vs {test.shape[1]}")
    if min(train.min(initial=0), test.min(initial=0)) < 0:
        raise TokenFormatError("tokens must be >= 0")
    top = int(max(train.max(initial=0), test.max(initial=0)))
    vocab = vocab_size if vocab_size is not None else stored_vocab if stored_vocab is not None else top + 1
    if top >= vocab:
        raise TokenFormatError(f"token {top} is out of range for vocab_size={vocab}")
    return train, test, int(vocab)

"""MAESTRO as token arrays (MIDI-derived event tokens, e.g. a REMI / MIDI-like vocabulary), local only.

This package does not tokenize MIDI: convert the MAESTRO performances once with your tokenizer and
save the tokens in ``data_dir`` in one of these formats:

* ``maestro_tokens.npz`` with arrays ``train`` and ``test`` and optionally a scalar ``vocab_size``;
* ``train.npy`` and ``test.npy``.

Each ``train`` / ``test`` array is either an integer array [N, T] (N windows of T tokens, used as is)
or, for variable-length performances, a flat 1-D integer array of all tokens with ``train_lengths`` /
``test_lengths`` (1-D integer arrays, one length per performance, summing to the flat length;
``train_lengths.npy`` / ``test_lengths.npy`` beside the ``.npy`` files); each performance is cut into
non-overlapping windows of ``seq_len`` tokens (a shorter tail is dropped). Files are read with
``allow_pickle=False``: object arrays (pickles, which can run code when loaded) are refused with a
message naming the ragged format instead. Tokens must be integers >= 0; ``vocab_size`` defaults to
the npz's ``vocab_size`` or else max token + 1 (over train and test).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

NPZ_NAME = "maestro_tokens.npz"
NPY_NAMES = ("train.npy", "test.npy")
DEFAULT_SEQ_LEN = 64
FORMAT_HINT = (
    f"'{NPZ_NAME}' (arrays 'train', 'test', optional 'vocab_size') or '{NPY_NAMES[0]}' + '{NPY_NAMES[1]}', "
    "each an int array [N, T] of event tokens, or a flat 1-D int array with 'train_lengths'/'test_lengths' "
    "(one length per performance) for variable-length sequences; no object (pickled) arrays"
)


class TokenFormatError(ValueError):
    """A token array has the wrong type, shape or values."""


def token_windows(seqs: "np.ndarray | list[np.ndarray]", seq_len: int = DEFAULT_SEQ_LEN, what: str = "tokens") -> np.ndarray:
    """[N, T] int array -> int64 as is; a list (or object array) of 1-D sequences -> int64 [W, seq_len] windows."""
    if isinstance(seqs, list):
        arr = np.empty(len(seqs), dtype=object)
        arr[:] = seqs
    else:
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


def _ragged(tokens: np.ndarray, lengths: np.ndarray | None, what: str) -> "np.ndarray | list[np.ndarray]":
    """``tokens`` as is without ``lengths``; else the flat 1-D ``tokens`` split into one sequence per length."""
    if lengths is None:
        return tokens
    lengths = np.asarray(lengths)
    if tokens.ndim != 1 or lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer) or (lengths < 0).any():
        raise TokenFormatError(f"{what}: with lengths, expected flat 1-D tokens and 1-D lengths >= 0; found {tokens.shape}, {lengths.dtype} {lengths.shape}")
    if int(lengths.sum()) != len(tokens):
        raise TokenFormatError(f"{what}: lengths sum to {int(lengths.sum())} but there are {len(tokens)} tokens")
    return np.split(tokens, np.cumsum(lengths)[:-1])


def read_maestro(data_dir: str | Path | None, seq_len: int = DEFAULT_SEQ_LEN,
                 vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """-> train int64 [N, T], test int64 [M, T], vocab_size. FileNotFoundError names the expected files."""
    if data_dir is None:
        raise FileNotFoundError(f"maestro needs data_dir: a folder with {FORMAT_HINT}")
    root = Path(data_dir)
    npz, npys = root / NPZ_NAME, [root / n for n in NPY_NAMES]
    stored_vocab = None
    try:
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as f:
                missing = [k for k in ("train", "test") if k not in f.files]
                if missing:
                    raise TokenFormatError(f"{npz}: missing array(s) {missing}; expected {FORMAT_HINT}")
                raw_train, raw_test = (_ragged(f[k], f[f"{k}_lengths"] if f"{k}_lengths" in f.files else None, f"{npz}:{k}")
                                       for k in ("train", "test"))
                if "vocab_size" in f.files:
                    stored_vocab = int(np.asarray(f["vocab_size"]).reshape(()))
        elif all(p.is_file() for p in npys):
            raw_train, raw_test = (
                _ragged(np.load(p, allow_pickle=False),
                        np.load(p.with_name(p.stem + "_lengths.npy"), allow_pickle=False) if p.with_name(p.stem + "_lengths.npy").is_file() else None,
                        str(p))
                for p in npys)
        else:
            raise FileNotFoundError(f"maestro: found neither {NPZ_NAME} nor both of {list(NPY_NAMES)} in {str(root)!r}; expected {FORMAT_HINT}")
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise TokenFormatError(f"{root}: holds an object (pickled) array, which is not loaded because a pickle can run "
                               f"code; save variable-length sequences as {FORMAT_HINT.split(', or ')[1]}") from exc
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

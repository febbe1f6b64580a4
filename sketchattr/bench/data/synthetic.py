"""Deterministic random-token sequences, generated lazily per index (no memory for 10⁵+ rows).

``RandomTokens(n, seq_len, vocab, seed)[i]`` is ``torch.randint(0, vocab, (seq_len,))`` drawn from
a CPU generator seeded with ``block_seed(seed, i, 0)``: the same tokens for the same
``(seed, i)`` in any order, process or resumed run, and nothing is held beyond the current item.
Use different seeds for train and query sets.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from sketchattr.project.base import _check_int, block_seed, cpu_generator


class RandomTokens(Dataset):
    """``n`` sequences of ``seq_len`` uniform tokens in ``[0, vocab)``; item ``i``: int64 [seq_len]."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        self.n, self.seq_len = _check_int("n", n, 1), _check_int("seq_len", seq_len, 2)
        self.vocab, self.seed = _check_int("vocab", vocab, 2), _check_int("seed", seed, 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} sequences")
        i %= self.n
        g = cpu_generator(block_seed(self.seed, i, 0))
        return torch.randint(0, self.vocab, (self.seq_len,), generator=g)

    def __repr__(self) -> str:
        return f"RandomTokens(n={self.n}, seq_len={self.seq_len}, vocab={self.vocab}, seed={self.seed})"

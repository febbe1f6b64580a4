"""Real English prose as a character-level language-modelling bench: scikit-learn's bundled dataset
descriptions (``sklearn/datasets/descr/*.rst``, about 43,000 characters, installed with the package).

The text is lower-cased, its whitespace collapsed, every character outside :data:`ALPHABET`
dropped, and cut into consecutive chunks of ``lengths[0]..lengths[1]`` characters (seeded); chunks
are dealt to the train set and the queries alternately from a seeded shuffle, so both cover every
file. Character c has token id ``3 + ALPHABET.index(c)`` (0..2 are reserved, 0 pads), like
:func:`~sketchattr.bench.data.markov.markov_text`'s sequences, so the same model and recipes apply.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ALPHABET", "ProseText", "prose_text"]

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:'()-"
"""The characters kept (46); the vocabulary is 3 reserved ids + these."""


@dataclass
class ProseText:
    """Train and query sequences (lists of ``{"input_ids": LongTensor [L]}``) and the vocabulary size."""

    train: list[dict]
    queries: list[dict]
    vocab: int


def corpus() -> str:
    """scikit-learn's dataset descriptions, normalised to :data:`ALPHABET` (one string)."""
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    files = sorted(folder.glob("*.rst"))
    if not files:
        raise FileNotFoundError(f"no dataset descriptions under {folder}: the prose bench reads scikit-learn's")
    text = " ".join(f.read_text(encoding="utf-8") for f in files).lower()
    text = re.sub(r"\s+", " ", text)
    return "".join(c for c in text if c in ALPHABET)


def prose_text(n_train: int = 400, n_query: int = 50, lengths: tuple[int, int] = (16, 24), seed: int = 0) -> ProseText:
    """``n_train`` + ``n_query`` chunks of the corpus, deterministic in ``seed``."""
    text, g = corpus(), np.random.RandomState(seed)
    chunks, start = [], 0
    while start < len(text):
        n = int(g.randint(lengths[0], lengths[1] + 1))
        if start + n <= len(text):
            chunks.append(text[start : start + n])
        start += n
    if len(chunks) < n_train + n_query:
        raise ValueError(f"the corpus gives {len(chunks)} chunks, fewer than {n_train} + {n_query}")
    picks = g.permutation(len(chunks))[: n_train + n_query]
    ids = [torch.tensor([3 + ALPHABET.index(c) for c in chunks[i]]) for i in picks]
    seqs = [{"input_ids": t} for t in ids]
    return ProseText(seqs[:n_train], seqs[n_train:], vocab=3 + len(ALPHABET))

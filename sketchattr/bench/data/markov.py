"""Generated text: a mixture of sparse Markov chains over a small vocabulary.

Each of ``n_chains`` "languages" gives every token three likely successors (probabilities 0.5,
0.3, 0.18, drawn without overlap from ids 3.., plus a small uniform floor; ``branching`` other
than 3 spreads 0.98 evenly over that many successors), different per language; a sequence picks a language, a random first token and a length, then walks its chain.
Sequences of one language share bigrams, so a language model trained on the mixture has
training examples that really help some queries and not others — a small, fully reproducible
stand-in for text. Token ids 0..2 are reserved (0 pads).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MarkovText", "markov_text"]


def chain_tables(n_chains: int, vocab: int, seed: int, branching: int = 3) -> torch.Tensor:
    """``[n_chains, vocab, vocab]`` transition probabilities (``branching`` likely successors per token)."""
    g = torch.Generator().manual_seed(seed)
    tables = torch.full((n_chains, vocab, vocab), 0.02 / vocab)
    weights = torch.tensor([0.5, 0.3, 0.18]) if branching == 3 else torch.full((branching,), 0.98 / branching)
    for c in range(n_chains):
        for tok in range(vocab):
            nxt = torch.randperm(vocab - 3, generator=g)[:branching] + 3
            tables[c, tok, nxt] += weights
    return tables / tables.sum(-1, keepdim=True)


@dataclass
class MarkovText:
    """Train and query sequences (lists of ``{"input_ids": LongTensor [L]}``) and their chains."""

    train: list[dict]
    queries: list[dict]
    train_chain: np.ndarray
    query_chain: np.ndarray
    vocab: int


def _sample(tables: torch.Tensor, n: int, lengths: tuple[int, int], g: torch.Generator,
            chains: list[int] | None) -> tuple[list[dict], np.ndarray]:
    data, chain_of = [], []
    n_chains, vocab = tables.shape[0], tables.shape[1]
    for i in range(n):
        c = chains[i % len(chains)] if chains else i % n_chains
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        ids = [int(torch.randint(3, vocab, (1,), generator=g))]
        for _ in range(length - 1):
            ids.append(int(torch.multinomial(tables[c, ids[-1]], 1, generator=g)))
        data.append({"input_ids": torch.tensor(ids)})
        chain_of.append(c)
    return data, np.array(chain_of)


def markov_text(n_train: int = 400, n_query: int = 50, vocab: int = 64, n_chains: int = 4,
                lengths: tuple[int, int] = (16, 24), seed: int = 0, query_chains: list[int] | None = None,
                branching: int = 3) -> MarkovText:
    """Sequences of ``lengths[0]..lengths[1]`` tokens; languages cycle over the train set, and over
    ``query_chains`` (default all) for the queries. Deterministic in ``seed``."""
    tables = chain_tables(n_chains, vocab, seed, branching)
    train, tc = _sample(tables, n_train, lengths, torch.Generator().manual_seed(seed + 1), None)
    queries, qc = _sample(tables, n_query, lengths, torch.Generator().manual_seed(seed + 2), query_chains)
    return MarkovText(train, queries, tc, qc, vocab)

"""Per-token attribution: which target tokens of a training sequence carry its influence on a query.

A sequence's training loss is the sum of its next-token losses, so its gradient, its sketched
row and (every scorer being linear in the train row) its score are sums over target tokens.
:func:`per_token_scores` sketches each token's loss gradient alone (the featurizer's
:meth:`~sketchattr.featurize.Featurizer.token_rows`, one hook-engine pass over copies of the
sequence) and scores it with the fitted scorer: the parts sum exactly to the sequence's score,
and removing token t from the loss (label −100) lowers the score by exactly part t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from sketchattr.score.queries import is_dataset_like
from sketchattr.featurize.featurizer import Featurizer
from sketchattr.score.base import Scorer

__all__ = ["TokenScores", "per_token_scores"]


@dataclass
class TokenScores:
    """scores: ``[n_query, n_seq, L]``, entry ``[q, j, t]`` the part of train sequence j's score
    for query q carried by its target token at position t (0 where nothing is predicted: the
    first token, padding, labels −100); indices: the sequences' dataset indices ``[n_seq]``."""

    scores: torch.Tensor
    indices: np.ndarray

    @property
    def totals(self) -> torch.Tensor:
        """The sequences' scores ``[n_query, n_seq]`` (the sum over tokens)."""
        return self.scores.sum(dim=-1)

    def top_tokens(self, query: int, sequence: int, k: int = 5) -> list[tuple[int, float]]:
        """The k positions with the largest parts for one query and sequence: ``[(position, score)]``."""
        s = self.scores[query, sequence]
        order = torch.argsort(s, descending=True)[: min(k, len(s))]
        return [(int(t), float(s[t])) for t in order]


def per_token_scores(scorer: Scorer, featurizer: Featurizer, queries: Any, dataset: Any,
                     indices: Sequence[int]) -> TokenScores:
    """Per-token scores of the training sequences ``indices`` of ``dataset`` for ``queries`` (in
    any form ``scorer.score`` takes them: a dataset, ``featurizer.query_rows(...)``, or the scorer's
    ``prepare_queries(...)``). ``featurizer`` is the one that built the
    scorer's store (same projector, modules, task with ``split_tokens``)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("no training sequences given")
    prepare = getattr(scorer, "prepare_queries", None)
    if is_dataset_like(queries) and getattr(scorer, "featurizer", None) is None:
        queries = featurizer.query_rows(queries)
    if callable(prepare):
        queries = prepare(queries)  # sketch / precondition the queries once for every sequence
    parts = [(featurizer.token_rows(dataset, int(i))) for i in idx]
    length = 1 + max([int(p.max()) for p, _ in parts if len(p)] + [0])
    out = None
    for j, (positions, rows) in enumerate(parts):
        if not len(positions):
            continue
        s = scorer.score_rows(queries, rows)  # [n_query, n_tokens]
        if out is None:
            out = s.new_zeros(s.shape[0], len(idx), length)
        out[:, j, torch.as_tensor(positions, device=s.device)] = s
    if out is None:
        raise ValueError("none of the sequences has a counted target token")
    return TokenScores(out, idx)

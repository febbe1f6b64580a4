"""The column budget of a sparse-eigenbasis store, chosen from the data (no ground truth).

:class:`~sketchattr.curvature.eigenbasis.SparseEigenbasisProjector` keeps, per training example, the
k = m/2 whitened EKFAC coordinates of largest magnitude. How many are needed differs from model to
model: on our language-model benches the width that keeps 95% of exact EKFAC's LDS ranged from d/16
(character-level prose) to d/2 (six dense Markov chains over 96 tokens). :func:`sparse_width` reads it
off a pilot: for P training examples it forms every whitened coordinate, scores the pilot against
itself exactly (``W Wᵀ``, training-loss gradients on both sides) and with each candidate width (every
example keeping its own top k), and returns the smallest width whose scores correlate with the exact
ones at ``target`` (Pearson over the pairs). On the three benches, a pilot Pearson of 0.98 picked
widths that kept 0.95–0.98× of EKFAC's LDS (0.97 picked one that kept 0.933× on the prose bench);
``benchmarks/lds_methods.py`` measures both.

Cost: the pilot's whitened coordinates, ``P × d`` numbers (P = 64 and d = 100K: 51 MB in float64),
and one featurize pass over the pilot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sketchattr.curvature.eigenbasis import SparseEigenbasisProjector
from sketchattr.curvature.factors import Factors
from sketchattr.featurize.featurizer import Featurizer

__all__ = ["SparseWidth", "sparse_width"]


@dataclass(frozen=True)
class SparseWidth:
    """The chosen store width ``m`` (= 2k columns) of d coordinates, and per candidate width the pilot's
    score correlation with exact EKFAC (``fidelity``: {m: Pearson})."""

    m: int
    d: int
    target: float
    fidelity: dict[int, float]

    def projector(self, factors: Factors, damping: "float | str | None" = "auto") -> SparseEigenbasisProjector:
        """The sparse-eigenbasis projector of this width."""
        return SparseEigenbasisProjector(self.m, factors, damping)


def sparse_width(factors: Factors, featurizer: Featurizer, dataset: Any, target: float = 0.98, pilot: int = 64,
                 damping: "float | str | None" = "auto", steps_per_octave: int = 2) -> SparseWidth:
    """The smallest sparse-eigenbasis width whose pilot scores correlate with exact EKFAC's at ``target``.

    featurizer: gives the model, task, modules, batch size and collate function (its own projector is
    not used). dataset: the training set; its first ``pilot`` rows are the pilot. Candidate widths: m =
    d / 2^(j / steps_per_octave) down to d/64 (even numbers), d the attributed parameters; if none
    reaches ``target``, the widest, d (``fidelity`` says by how much it missed; an identity store of d
    columns is exact EKFAC).
    """
    if not 0 < target < 1:
        raise ValueError(f"target must be a correlation in (0, 1), got {target!r}")
    if pilot < 3:
        raise ValueError(f"pilot must be at least 3 examples (pairs are correlated), got {pilot}")
    d = sum(featurizer.selection().dims)
    everything = SparseEigenbasisProjector(2 * d, factors, damping)
    feat = Featurizer(featurizer.model, featurizer.task, modules=list(featurizer.selection().names), projector=everything,
                      batch_size=featurizer.batch_size, device=featurizer.device, dtype=featurizer.dtype,
                      progress=False, collate_fn=featurizer.collate_fn)
    n = len(feat._dataset_of(dataset))
    rows = feat.train_rows(dataset, indices=range(min(pilot, n)))
    vals = rows[:, :d].double()  # each example's whitened coordinates, largest magnitude first
    idx = rows[:, d:].contiguous().view(torch.int32).long()
    full = torch.zeros(len(rows), d, dtype=torch.float64).scatter_(1, idx, vals)
    exact = full @ full.T
    pairs = ~torch.eye(len(rows), dtype=torch.bool)
    candidates = sorted({2 * max(1, int(d / 2 ** (j / steps_per_octave)) // 2) for j in range(6 * steps_per_octave + 1)})
    fidelity = {}
    for m in candidates:  # narrowest first: stop at the first that reaches the target
        k = min(m // 2, d)
        kept = torch.zeros_like(full).scatter_(1, idx[:, :k], vals[:, :k])
        approx = full @ kept.T
        r = torch.corrcoef(torch.stack([exact[pairs], approx[pairs]]))[0, 1]
        fidelity[m] = float(r) if math.isfinite(float(r)) else 0.0
        if fidelity[m] >= target:
            return SparseWidth(m, d, target, fidelity)
    return SparseWidth(max(candidates), d, target, fidelity)

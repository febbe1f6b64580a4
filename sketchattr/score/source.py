"""Training-aware influence over the segments of one training run (SOURCE: Bae et al., NeurIPS 2024).

Influence functions assume training reached an optimum; a model trained for a few epochs did not.
SOURCE unrolls training instead, approximately: split the run into segments ℓ = 1..L (between saved
checkpoints), take the curvature H_ℓ of segment ℓ as constant (EKFAC at its checkpoint), and follow
how up-weighting example m changes the parameters through gradient descent. Over segment ℓ, with
c_ℓ = Σ η (the learning rate summed over its steps), a perturbation δ of the parameters becomes
``S_ℓ δ`` with ``S_ℓ = exp(−c_ℓ H_ℓ)``, and the example's own gradient ḡ_ℓ(z_m) adds
``−(I − S_ℓ) H_ℓ⁻¹ ḡ_ℓ(z_m)``. At the end of training the query's measurement has moved by

    scores[q, m] = − Σ_ℓ ∇f(z_q)ᵀ S_L ⋯ S_{ℓ+1} F_ℓ ḡ_ℓ(z_m),     F_ℓ = (I − exp(−c_ℓ H_ℓ)) H_ℓ⁻¹,

(the sign of docs/design.md: positive = the example helps the query). In segment ℓ's EKFAC
eigenbasis both S_ℓ and F_ℓ are diagonal — exp(−c_ℓ Λ) and (1 − exp(−c_ℓ Λ))/Λ, whose limit at
Λ = 0 is c_ℓ — so the query is carried backwards through the segments (``u ← S_ℓ u``, each in its
own basis), and at each segment ``F_ℓ u`` is sketched with the store's projector and scored against
that segment's train rows. No damping is needed: F_ℓ is bounded by c_ℓ (a short segment scores like
TracIn, a long one like undamped influence).

Units: Λ is EKFAC's (the second moment of the Task's per-example training-loss gradients), so
``lr_steps`` must be the learning rate summed over the segment's steps *per unit of that per-example
loss*: for SGD on the mean loss of batches, Σ η; with momentum β, Σ η / (1 − β); for a loss divided by
the batch's token count, Σ η / (mean tokens per example). Adam's per-coordinate step sizes are not
modelled (Bae et al.'s App. D); give the segment's effective step in those units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from sketchattr.curvature.factors import Factors, fit_factors
from sketchattr.curvature.passes import rotate
from sketchattr.featurize.featurizer import Featurizer
from sketchattr.score.base import Scorer
from sketchattr.score.checkpoints import featurize_checkpoints
from sketchattr.score.ekfac import EKFACScorer
from sketchattr.score.queries import is_dataset_like
from sketchattr.store import GradientStore, StoreMismatchError, aligned_blocks
from sketchattr.store.base import require_dense_rows

__all__ = ["Segment", "SourceInfluence", "SourceQueries", "segment_backward", "segment_weight", "source_from_checkpoints"]


@dataclass(frozen=True)
class Segment:
    """One segment of the training run: EKFAC ``factors`` fitted at its checkpoint, the
    ``featurizer`` on that checkpoint's model that built its store (every segment: the same modules
    and projector), and ``lr_steps`` c_ℓ (the module docstring says in which units)."""

    factors: Factors
    featurizer: Featurizer
    lr_steps: float


@dataclass
class SourceQueries:
    """The queries carried through the run: one sketched row block ``[n_query, m]`` per segment."""

    rows: list[torch.Tensor]

    def __len__(self) -> int:
        return self.rows[0].shape[0]


def segment_weight(lam: torch.Tensor, c: float) -> torch.Tensor:
    """F's eigenvalues (1 − exp(−c Λ))/Λ, = c at Λ = 0 (computed as c · (1 − e^{−x})/x, x = cΛ)."""
    x = c * lam.clamp(min=0)
    safe = torch.where(x > 0, x, torch.ones_like(x))
    return c * torch.where(x > 0, -torch.expm1(-safe) / safe, torch.ones_like(x))


def segment_backward(lam: torch.Tensor, c: float) -> torch.Tensor:
    """S's eigenvalues exp(−c Λ)."""
    return torch.exp(-c * lam.clamp(min=0))


def spectral_map(dw: torch.Tensor, qs: torch.Tensor | None, qa: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """``Q_S [(Q_Sᵀ G Q_A) ∘ values] Q_Aᵀ`` (a None basis is the identity): ``[B, r, c]`` -> ``[B, r, c]``."""
    u = rotate(dw, qs, qa) * values
    if qa is not None:
        u = u @ qa.T
    if qs is not None:
        u = qs @ u
    return u


class SourceInfluence(Scorer, name="source"):
    """SOURCE scores over the segments of one run (see the module docstring).

    segments: in training order. query_featurizer: differentiates the queries at the end of
    training (default: the last segment's featurizer, i.e. its checkpoint is the final model).
    block_rows: train rows per streamed block of the segment stores (read together).
    """

    def __init__(self, segments: Sequence[Segment], query_featurizer: Featurizer | None = None,
                 block_rows: int | None = None) -> None:
        self.segments = list(segments)
        if not self.segments:
            raise ValueError("SourceInfluence needs at least one segment")
        for i, s in enumerate(self.segments):
            if not isinstance(s, Segment):
                raise TypeError(f"segment {i} must be a sketchattr Segment(factors, featurizer, lr_steps), got {type(s).__name__}")
            if not (isinstance(s.lr_steps, (int, float)) and math.isfinite(s.lr_steps) and s.lr_steps >= 0):
                raise ValueError(f"segment {i}: lr_steps must be a finite number >= 0, got {s.lr_steps!r}")
        specs = {repr(s.featurizer.projector.spec()) for s in self.segments}
        names = {tuple(s.featurizer.selection().names) for s in self.segments}
        if len(specs) != 1 or len(names) != 1:
            raise ValueError("every segment's featurizer must use the same modules and projector (type, m, seed)")
        self.query_featurizer = query_featurizer or self.segments[-1].featurizer
        self._curvature = [EKFACScorer(s.factors, s.featurizer) for s in self.segments]  # their EKFAC bases
        self._queries = EKFACScorer(self.segments[-1].factors, self.query_featurizer)  # query gradients at the end
        self.blocks = self._queries.blocks
        self.block_rows = block_rows

    # ------------------------------------------------------------------ fitting
    def fit(self, stores: "Sequence[GradientStore]") -> "SourceInfluence":
        """Bind one store per segment (its featurizer's, the same train rows in the same order)."""
        stores = list(stores)
        if len(stores) != len(self.segments):
            raise ValueError(f"{len(stores)} stores for {len(self.segments)} segments: give one store per segment")
        for i, (store, seg) in enumerate(zip(stores, self.segments)):
            if store.metadata is None or len(store) == 0:
                raise ValueError(f"the store of segment {i} holds no rows: featurize the training set first")
            require_dense_rows(store.metadata, "SourceInfluence")
            try:
                store.metadata.check_matches(seg.featurizer.metadata("train"))
            except StoreMismatchError as exc:
                raise StoreMismatchError(f"segment {i}: {exc}") from None
        ref = stores[0].indices
        for i, store in enumerate(stores[1:], start=1):
            if not np.array_equal(store.indices, ref):
                raise StoreMismatchError(f"segment {i}'s store holds other train rows than segment 0's (or another order)")
        self.stores, self.train_indices, self.n_train = stores, np.asarray(ref), len(ref)
        return self

    # ------------------------------------------------------------------ queries
    def prepare_queries(self, queries: Any) -> SourceQueries:
        """The query gradients at the end of training carried back through the segments and
        sketched: ``rows[ℓ] = P F_ℓ S_{ℓ+1} ⋯ S_L ∇f`` ``[n_query, m]``."""
        if isinstance(queries, SourceQueries):
            return queries
        if not is_dataset_like(queries):
            raise TypeError(f"SourceInfluence takes the query examples (a Dataset, a DataLoader or a tuple of tensors) "
                            f"or its prepare_queries(...); got {type(queries).__name__}")
        grads = [torch.cat(parts) for parts in zip(*[g for _, g in self._queries.module_gradients(queries, "query")])]
        u = [g.to(self._curvature[-1].dtype) for g in grads]
        rows: list[torch.Tensor] = [torch.empty(0)] * len(self.segments)
        for i in reversed(range(len(self.segments))):
            c, bases = float(self.segments[i].lr_steps), self._curvature[i].bases
            weighted = [spectral_map(x, qs, qa, segment_weight(lam, c)) for x, (qs, qa, lam) in zip(u, bases)]
            flat = [b.layout.to_flat(x) for b, x in zip(self.blocks, weighted)]
            rows[i] = self.segments[i].featurizer.projector.project_query(flat)
            u = [spectral_map(x, qs, qa, segment_backward(lam, c)) for x, (qs, qa, lam) in zip(u, bases)]
        return SourceQueries(rows)

    # ------------------------------------------------------------------ scoring
    def iter_scores(self, queries: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (train dataset indices [b], scores [n_query, b]), the segment stores read together."""
        self._check_fitted()
        prepared = self.prepare_queries(queries)
        proj = self.segments[0].featurizer.projector
        for idx, blocks in aligned_blocks(self.stores, self.block_rows, label="segment"):
            total = None
            for q, rows in zip(prepared.rows, blocks):
                part = -proj.inner(q, rows.to(q.device))
                total = part if total is None else total + part
            yield idx, total


def source_from_checkpoints(
    models: Sequence[torch.nn.Module],
    task: Any,
    train_dataset: Any,
    lr_steps: "Sequence[float] | float",
    fisher: str = "true",
    batch_size: int = 64,
    collate_fn: Any = None,
    progress: bool = True,
    **featurize_options: Any,
) -> SourceInfluence:
    """Featurize ``train_dataset`` and fit EKFAC factors on every checkpoint model; return a fitted
    :class:`SourceInfluence` (the last model is the end of training: queries are differentiated there).

    models: one checkpoint per segment, in training order (each segment's curvature is taken at
    its checkpoint, as Bae et al. do).
    lr_steps: c_ℓ per segment (one value: the same for all), in the module docstring's units.
    fisher: the EKFAC factors' (``"true"`` or ``"empirical"``). featurize_options: projector, m,
    seed, modules, sampler, store, path, device, overwrite, as :func:`featurize_checkpoints`
    (disk default ``grad_cache/source.h5``).
    """
    models = list(models)
    steps = [float(lr_steps)] * len(models) if isinstance(lr_steps, (int, float)) else [float(c) for c in lr_steps]
    if len(steps) != len(models):
        raise ValueError(f"{len(steps)} lr_steps for {len(models)} checkpoints: give one per checkpoint (or one for all)")
    featurize_options.setdefault("default_path", "grad_cache/source.h5")
    featurizers, stores = featurize_checkpoints(models, task, train_dataset, batch_size=batch_size, collate_fn=collate_fn,
                                                progress=progress, **featurize_options)
    segments = []
    for model, feat, c in zip(models, featurizers, steps):
        factors = fit_factors(model, task, train_dataset, kind="ekfac", modules=feat.selection().names, fisher=fisher,
                              batch_size=batch_size, collate_fn=collate_fn, progress=progress)
        segments.append(Segment(factors, feat, c))
    return SourceInfluence(segments).fit(stores)

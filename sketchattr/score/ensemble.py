"""Ensembled influence: one scorer per member model, scores averaged over the members.

    scores[q, i] = Σ_c w_c · s_c[q, i] / Σ_c w_c       (uniform w_c = 1 by default)

where s_c is member c's own scorer — :class:`~sketchattr.score.SketchedInfluence` on its own store
(its own F̂ and its own ``damping="auto"`` λ) or an EKFAC-family scorer with its own factors. Members
are independently trained models (TRAK's ensembles) or checkpoints of one training run (the cheap
version: no extra training). Each member's score follows the sign convention of docs/design.md, so
the average does too: positive = example i helps query q on average over the members.

``normalize="rms"`` divides each member's scores for a query by their root mean square over the
train rows before averaging, so every member has the same say in each query's ranking (one extra
streamed pass over the stores). Useful when members' scores differ in scale, e.g. early and late
checkpoints; ``"none"`` (default) averages the raw scores.

One store per member, every store holding the same train rows in the same order, e.g. one HDF5
group per member in one file (``DiskStore(path, checkpoint=f"member{c}")``, what
:func:`featurize_members` writes, resumable). Scoring streams the stores together: a block of train
rows is read from every member's store, scored by each member and averaged, so ``top_k`` and
``score_to_hdf5`` never hold the full matrix (memory O(n_members · block_rows · m)).

>>> feats, stores = featurize_members(models, sa.ClassificationTask(), train, projector="sjlt", m=1024,
...                                   path="grad_cache/ensemble.h5")
>>> ens = EnsembleInfluence([sa.SketchedInfluence(featurizer=f) for f in feats]).fit(stores)
>>> top = ens.top_k(query_dataset, k=10)         # every member sketches the queries with its own model
>>> prepared = ens.prepare_queries(query_dataset) # EnsembleQueries: reusable, one prepared form per member

EKFAC members: ``EnsembleInfluence([sa.EKFACScorer(sa.fit_factors(f.model, task, train), f) for f in feats])``.
Distributed: ``featurize_members(..., collective=c)`` writes each rank's shard of every member and
``fit(stores, collective=c)`` fits every member across the ranks (see :class:`~sketchattr.score.base.Scorer`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from sketchattr.distributed.featurize import featurize as featurize_sharded
from sketchattr.featurize.featurizer import Featurizer
from sketchattr.score.base import Scorer
from sketchattr.score.ekfac import PreparedQueries
from sketchattr.score.queries import QueryRows, is_dataset_like
from sketchattr.score.sketched_influence import SketchedInfluence
from sketchattr.store import GradientStore, StoreMismatchError, aligned_blocks

if TYPE_CHECKING:
    from sketchattr.distributed.collective import Collective

BlockFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EnsembleQueries:
    """One query set prepared by every member: ``parts[c]`` is member c's own prepared form
    (:class:`QueryRows` ``[n_query, m]`` for SketchedInfluence, :class:`PreparedQueries` for the
    EKFAC family). Returned by :meth:`EnsembleInfluence.prepare_queries`; every scoring method
    takes it in place of the query examples (no gradient is recomputed)."""
    parts: tuple[Any, ...]

    def __post_init__(self) -> None:
        sizes = {_n_rows(p) for p in self.parts}
        if not self.parts or len(sizes) != 1:
            raise ValueError(f"EnsembleQueries needs one prepared form per member with the same number of queries; got {sorted(sizes)}")

    def __len__(self) -> int:
        return _n_rows(self.parts[0])


class EnsembleInfluence(Scorer, name="ensemble"):
    """Influence averaged over member models, each scored by its own scorer on its own store.

    members: one unfitted scorer per member, in the order of the stores given to :meth:`fit` —
        ``SketchedInfluence(featurizer=feat_c)`` (needs its featurizer to sketch query examples) or
        ``EKFACScorer(factors_c, feat_c)`` (and the other EKFAC-family scorers); members may mix kinds.
    weights: w_c per member (default uniform); the ensemble's scores are Σ w_c s_c / Σ w_c.
    normalize: ``"none"`` (average raw scores) or ``"rms"`` (each member's scores for a query divided
        by their root mean square over all train rows first; one more pass over the stores).
    block_rows: train rows per streamed block, read from every member's store together
        (default: the first store's own choice).

    After ``fit``: ``train_indices`` [n_train] (shared by every member), ``members`` (fitted; e.g.
    ``members[c].damping_`` is member c's λ), ``n_members``.
    """
    def __init__(
        self,
        members: Sequence[Scorer],
        weights: "Sequence[float] | None" = None,
        normalize: str = "none",
        block_rows: int | None = None,
    ) -> None:
        self.members = list(members)
        if not self.members or not all(isinstance(s, Scorer) for s in self.members):
            raise TypeError("EnsembleInfluence needs a non-empty list of scorers, one per member "
                            "(e.g. [SketchedInfluence(featurizer=f) for f in featurizers])")
        if any(isinstance(s, EnsembleInfluence) for s in self.members):
            raise TypeError("members of an ensemble cannot be ensembles themselves: list their members instead")
        w = [1.0] * len(self.members) if weights is None else [float(x) for x in weights]
        if len(w) != len(self.members) or not all(np.isfinite(x) and x > 0 for x in w):
            raise ValueError(f"weights must be {len(self.members)} finite floats > 0, got {weights!r}")
        self.weights = [x / sum(w) for x in w]
        if normalize not in ("none", "rms"):
            raise ValueError(f"normalize must be 'none' or 'rms', got {normalize!r}")
        self.normalize = normalize
        if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
            raise ValueError(f"block_rows must be None or an int >= 1, got {block_rows!r}")
        self.block_rows = block_rows

    @property
    def n_members(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------ fitting
    def fit(self, stores: Sequence[GradientStore], collective: "Collective | None" = None) -> "EnsembleInfluence":
        """Fit every member on its own store (member c on ``stores[c]``: its own F̂ and λ, or its
        factors), then check that the stores hold the same train rows in the same order.

        Raises StoreMismatchError when a store was not built by its member's featurizer (another
        model, projector, seed or module set) or when members hold different train indices.
        collective: each store is this rank's shard; every member fits across the ranks.
        """
        stores = list(stores) if not isinstance(stores, GradientStore) else [stores]
        if len(stores) != self.n_members:
            raise ValueError(f"{len(stores)} stores for {self.n_members} members: give one store per member, in order")
        for c, (member, store) in enumerate(zip(self.members, stores)):
            feat = getattr(member, "featurizer", None)
            if isinstance(feat, Featurizer) and store.metadata is not None:
                try:
                    store.metadata.check_matches(feat.metadata("train"))
                except StoreMismatchError as err:
                    raise StoreMismatchError(f"member {c}'s store was not built by member {c}'s featurizer: {err}") from None
            member.fit(store, collective=collective)
        self._bind(stores[0], collective)
        for c, member in enumerate(self.members[1:], start=1):
            for what in ("shard_indices", "train_indices"):
                mine, ref = getattr(member, what), getattr(self, what)
                if len(mine) != len(ref) or not np.array_equal(mine, ref):
                    raise StoreMismatchError(
                        f"member {c} holds other train rows than member 0 ({len(mine)} vs {len(ref)} rows, or another "
                        "order): featurize every member with the same indices / sampler (featurize_members does)"
                    )
        self.stores = stores
        return self

    # ------------------------------------------------------------------ queries
    def prepare_queries(self, queries: Any) -> EnsembleQueries:
        """Queries prepared by every member (its own model's gradients, sketched and, for EKFAC,
        preconditioned): reusable by every scoring call.

        queries: the query examples (a Dataset, DataLoader, tuple of tensors), an
        :class:`EnsembleQueries`, or a list with one prepared form per member (member c's
        ``featurizer.query_rows(...)`` or ``prepare_queries(...)``), each checked by its member.
        """
        if isinstance(queries, EnsembleQueries):
            parts = list(queries.parts)
        elif isinstance(queries, (list, tuple)) and queries and all(isinstance(p, (QueryRows, PreparedQueries)) for p in queries):
            parts = list(queries)
        elif isinstance(queries, (QueryRows, PreparedQueries)) and self.n_members == 1:
            parts = [queries]
        elif isinstance(queries, (QueryRows, PreparedQueries)):
            raise TypeError(f"one member's query rows cannot score an ensemble of {self.n_members} members (each member "
                            "is another model): pass the query examples, or one prepared form per member")
        elif is_dataset_like(queries):
            parts = [member.prepare_queries(queries) for member in self.members]
            return EnsembleQueries(tuple(parts))
        else:
            raise TypeError(f"EnsembleInfluence takes the query examples (a Dataset, a DataLoader or a tuple of tensors), "
                            f"its prepare_queries(...) output, or one prepared form per member; got {type(queries).__name__}")
        if len(parts) != self.n_members:
            raise ValueError(f"{len(parts)} prepared query forms for {self.n_members} members")
        return EnsembleQueries(tuple(member.prepare_queries(p) for member, p in zip(self.members, parts)))

    # ------------------------------------------------------------------ scoring
    def iter_scores(self, queries: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (train dataset indices [b], averaged scores [n_query, b]), reading a block of every
        member's store together."""
        self._check_fitted()
        prepared = self.prepare_queries(queries)
        fns = [_block_scorer(member, part) for member, part in zip(self.members, prepared.parts)]
        scale = self._rms(fns) if self.normalize == "rms" else None
        for idx, blocks in aligned_blocks(self.stores, self.block_rows, label="member"):
            total = None
            for c, (fn, rows) in enumerate(zip(fns, blocks)):
                part = fn(rows).to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
                w = self.weights[c] if scale is None else self.weights[c] / scale[c].to(part)[:, None]
                total = part * w if total is None else total.add_(part * w)
            yield idx, total

    def score(self, queries: Any) -> torch.Tensor:
        """Averaged scores [n_query, n_train] (columns in store row order, dataset indices ``train_indices``)."""
        return super().score(queries)

    def top_k(self, queries: Any, k: int = 10) -> Any:
        """Top-k proponents / opponents of the averaged scores per query (streamed, no full matrix)."""
        return super().top_k(self.prepare_queries(queries), k=k)

    def score_to_hdf5(self, queries: Any, path: Any, dataset: str = "scores", k: int | None = None) -> Any:
        """Write the averaged [n_query, n_train] matrix to ``path`` in column chunks (see :class:`Scorer`)."""
        return super().score_to_hdf5(self.prepare_queries(queries), path, dataset=dataset, k=k)

    def member_scores(self, queries: Any) -> list[torch.Tensor]:
        """Each member's own scores [n_query, n_train] (before averaging), e.g. to study agreement."""
        self._check_fitted()
        prepared = self.prepare_queries(queries)
        return [member.score(part) for member, part in zip(self.members, prepared.parts)]

    # ------------------------------------------------------------------ internals
    def _rms(self, fns: Sequence[BlockFn]) -> list[torch.Tensor]:
        """Per member, the root mean square over all train rows (all ranks) of each query's scores: [n_query]."""
        sums: list[torch.Tensor | None] = [None] * len(fns)
        for _, blocks in aligned_blocks(self.stores, self.block_rows, label="member"):
            for c, (fn, rows) in enumerate(zip(fns, blocks)):
                sq = fn(rows).double().pow(2).sum(dim=1).cpu()
                sums[c] = sq if sums[c] is None else sums[c] + sq
        out = []
        for s in sums:
            s = s if self.collective is None else self.collective.sum(s)
            out.append(torch.where(s > 0, (s / len(self.train_indices)).sqrt(), torch.ones_like(s)))
        return out


def _block_scorer(member: Scorer, prepared: Any) -> BlockFn:
    """Member scores [n_query, b] of a block of its store's rows [b, m], queries prepared once."""
    if isinstance(member, SketchedInfluence):
        u = -member.precondition(prepared)  # [n_query, m]: the member's (F̂ + λI)⁻¹q̂, solved once

        def fn(rows: torch.Tensor) -> torch.Tensor:
            dtype = rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32
            return u.to(dtype) @ rows.to(device=u.device, dtype=dtype).T

        return fn
    return lambda rows: member.score_rows(prepared, rows)


def _n_rows(prepared: Any) -> int:
    if isinstance(prepared, PreparedQueries):
        return prepared.shape[0]
    return len(prepared)


def featurize_members(
    models: Sequence[torch.nn.Module],
    task: Any,
    train_dataset: Any,
    projector: str = "sjlt",
    m: int | None = 1024,
    seed: "int | Sequence[int]" = 0,
    modules: Any = None,
    sampler: Any = None,
    path: Any = None,
    names: "Sequence[str] | None" = None,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    collective: "Collective | None" = None,
    **featurizer_kwargs: Any,
) -> tuple[list[Featurizer], list[GradientStore]]:
    """Sketch ``train_dataset``'s training gradients on every member model: (featurizers, stores), one each.

    models: the members (independently trained models or checkpoints of one run). projector / m /
    modules / batch_size / device / ``featurizer_kwargs``: as :class:`Featurizer`, the same for all.
    seed: the projector seed — an int s gives member c the seed s + c (independent sketches, so the
    ensemble also averages out sketch noise), or one seed per member. sampler: the same seeded
    sampler for every member (so every store holds the same rows). path: an HDF5 file, one group
    per member (``names``, default ``member0``, ``member1``, ...); re-running resumes every group
    (rows already written are skipped). Without ``path``: in-memory stores.
    collective: each rank featurizes its shard of every member (:func:`sketchattr.distributed.featurize`).
    """
    models = list(models)
    if not models:
        raise ValueError("give at least one member model")
    seeds = [int(seed) + c for c in range(len(models))] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    names = [f"member{c}" for c in range(len(models))] if names is None else [str(n) for n in names]
    if len(seeds) != len(models) or len(names) != len(models):
        raise ValueError(f"{len(models)} members need {len(models)} seeds and names; got {len(seeds)} and {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"member names must be distinct (one store group each), got {names}")
    feats, stores = [], []
    for c, model in enumerate(models):
        feat = Featurizer(model, task, modules=modules, projector=projector, m=m, seed=seeds[c], batch_size=batch_size,
                          device=device, progress=progress, **featurizer_kwargs)
        if collective is not None:

            store = featurize_sharded(feat, train_dataset, path=path, sampler=sampler, collective=collective,
                                      overwrite=overwrite, **({"checkpoint": names[c]} if path is not None else {}))
        elif path is not None:
            store = feat.featurize(train_dataset, store="disk", sampler=sampler, overwrite=overwrite, path=path, checkpoint=names[c])
        else:
            store = feat.featurize(train_dataset, sampler=sampler, overwrite=overwrite)
        feats.append(feat)
        stores.append(store)
    return feats, stores

"""EKFAC, KFAC, diagonal and identity influence on a sketched gradient store.

Per block k (any module the hook engine covers, see :mod:`sketchattr.curvature`) a query's
measurement gradient as a matrix G_q ``[rows(+1), cols(+1)]`` (``[1, d]`` for blocks without
Kronecker structure) is preconditioned with the fitted curvature,

    u = Q_S [(Q_Sᵀ G_q Q_A) ⊘ (Λ + λ)] Q_Aᵀ     (diagonal: G_q ⊘ (Λ + λ); identity: G_q),

flattened in the featurizer's layout, sketched with the store's projector, and scored against
the stored train rows: ``scores[q, i] = −(P u_q)ᵀ ĝ_i`` (positive = example i helps the query;
Kronfluence reports the opposite sign). Train gradients come from the store only; the model is
differentiated for the queries alone. With the identity projector the scores equal the
unsketched formulas. Damping λ per module: ``"auto"`` (default) = max(Λ)/3·10⁴, a condition-number
cap (:func:`~sketchattr.curvature.damping.module_damping`: within 0.010 LDS of the best c·mean(Λ) on the
digits MLP, CNN, transformer bench, MNIST MLP and an Adam-trained MLP, seeds 0–3); ``None`` = 0.1·mean(Λ) (Kronfluence's heuristic);
a float; or {module: λ}.

Options: ``query_rank=k`` replaces each module's u by its rank-k truncated SVD before
sketching (:func:`query_rank_agreement` measures what that costs); ``query_dtype`` computes
query gradients in bf16/fp16 (preconditioning stays in the factors' dtype); ``score_dtype``
sets the dtype of the streamed products (default: the store rows' precision, at least fp32);
``profile=True`` prints a per-stage timing table after each scoring run. ``score_grid(queries,
dampings)`` scores several dampings from one pass of query gradients and one read of the store.

Damping and sketching: the sketch adds noise of order ‖u‖‖g‖/√m to each score, and a weakly
damped u is large, so sketched EKFAC wants more damping than exact EKFAC (on digits-mlp, SJLT
m = 1024, LDS rises from ~0.15 at 0.1·mean(Λ) to ~0.46 at 10·mean(Λ); exact EKFAC peaks near
0.1–1·mean(Λ)). ``python benchmarks/ekfac_digits.py`` prints the current figures.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import numpy as np
import scipy.stats
import torch

from sketchattr.curvature.factors import CURVATURE, CURVATURE_REMEDY, Factors
from sketchattr.curvature.passes import rotate
from sketchattr.curvature.stages import FactorsMismatchError
from sketchattr.core.profiler import Profiler
from sketchattr.featurize.featurizer import Featurizer
from sketchattr.featurize.fingerprint import model_fingerprint
from sketchattr.score.base import Scorer
from sketchattr.curvature.damping import module_damping
from sketchattr.score.topk import TopK
from sketchattr.score.queries import QueryRows, is_dataset_like, sketch_differences
from sketchattr.store import GradientStore, StoreMetadata, StoreMismatchError

if TYPE_CHECKING:
    from sketchattr.distributed.collective import Collective

Curvature = tuple["torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


@dataclass
class PreparedQueries:
    """Preconditioned, sketched query rows, reusable across scoring calls.

    rows: ``[n_query, m]``, or per module ``[n_query, d_k]`` when ``per_module`` (identity
    projector only). Pass to ``score``/``top_k``/``score_to_hdf5`` instead of a dataset.
    """

    rows: "torch.Tensor | list[torch.Tensor]"
    per_module: bool = False
    metadata: "StoreMetadata | None" = None  # the preparing scorer's sketch; another store refuses them

    @property
    def shape(self) -> tuple[int, int]:
        """(n_query, total width)."""
        parts = self.rows if self.per_module else [self.rows]
        return parts[0].shape[0], sum(r.shape[1] for r in parts)


class CurvatureScorer(Scorer):
    """Base of the factored-curvature scorers; subclasses only name their curvature kind.

    factors: from :func:`~sketchattr.curvature.fit_factors` on the same model and modules
    (None for :class:`IdentityScorer`). featurizer: the one that built the store (model, task,
    modules, projector, batch size, device). damping: "auto" (max(Λ)/3·10⁴ per module), None (0.1·mean(Λ)
    per module), λ > 0, or {module name: λ} (one per attributed module).
    query_rank: rank-k truncation of each preconditioned query matrix (None = full rank).
    query_dtype: dtype of query gradients (default: the featurizer's). score_dtype: dtype of
    the streamed products. block_rows: store rows per streamed block. profile: print timings.

    After construction: ``damping_`` ({module: λ}), ``blocks`` (the featurizer's hook-engine
    blocks: names, layouts).
    """

    curvature_kind: ClassVar[str | None] = None

    def __init__(
        self,
        factors: Factors | None,
        featurizer: Featurizer,
        damping: "float | str | dict[str, float] | None" = "auto",
        query_rank: int | None = None,
        query_dtype: torch.dtype | None = None,
        score_dtype: torch.dtype | None = None,
        block_rows: int | None = None,
        profile: bool = False,
    ) -> None:
        _check_damping(damping, featurizer.selection().names)
        if query_rank is not None and (isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1):
            raise ValueError(f"query_rank must be None or an int >= 1, got {query_rank!r}")
        self.featurizer = featurizer
        self.factors = factors
        self.query_rank = query_rank
        self.score_dtype = score_dtype
        self.block_rows = block_rows
        self.profile = profile
        self.profiler = Profiler(enabled=True)
        names = featurizer.selection().names
        featurizer.engine.require(CURVATURE, CURVATURE_REMEDY)
        self.blocks = featurizer.engine.blocks
        self.device = featurizer.device
        self.dtype = torch.float64 if factors is None else factors.dtype
        if featurizer.preconditioner is not None:
            raise ValueError("the EKFAC family preconditions raw gradients with its own curvature: use a store built "
                             "without an optimizer preconditioner")
        self._grad_featurizer = Featurizer(
            featurizer.model, featurizer.task, modules=list(names), projector="identity",
            batch_size=featurizer.batch_size, device=featurizer.device,
            dtype=query_dtype or featurizer.dtype, progress=featurizer.progress,
            engine=featurizer.engine_choice, collate_fn=featurizer.collate_fn,
        )
        self._bases = self._undamped_curvature()
        self._curvature, self.damping_ = self._damped(damping)

    # ------------------------------------------------------------------ curvature
    def _undamped_curvature(self) -> list[Curvature]:
        """Per module (Q_S, Q_A, Λ) on the compute device, fetched once; all None for the identity."""
        if self.curvature_kind is None:
            return [(None, None, None)] * len(self.blocks)
        if self.factors is None:
            raise ValueError(f"{type(self).__name__} needs fitted factors (fit_factors(..., kind=...))")
        _check_factors(self.factors, self.featurizer)
        move = lambda t: None if t is None else t.to(device=self.device, dtype=self.dtype)
        return [tuple(move(t) for t in self.factors.curvature(block.name, self.curvature_kind)) for block in self.blocks]

    @property
    def bases(self) -> list[Curvature]:
        """Per block the undamped curvature (Q_S, Q_A, Λ) on the compute device (None bases: identity)."""
        return list(self._bases)

    def _damped(self, damping: "float | str | dict[str, float] | None") -> tuple[list[Curvature], dict[str, float]]:
        """Per module (Q_S, Q_A, Λ + λ) and {module: λ} for one damping (see the class docstring)."""
        if self.curvature_kind is None:
            return list(self._bases), {}
        curvature, lambdas = [], {}
        for block, (qs, qa, lam) in zip(self.blocks, self._bases):
            chosen = damping[block.name] if isinstance(damping, dict) else damping
            lambdas[block.name] = module_damping(lam, chosen, f"module {block.name}")
            curvature.append((qs, qa, lam + lambdas[block.name]))
        return curvature, lambdas

    def precondition(self, dws: Sequence[torch.Tensor], curvature: "list[Curvature] | None" = None) -> list[torch.Tensor]:
        """Per block u = M_k G: [B, rows(+1), cols(+1)] -> same shape (in the factors' dtype);
        ``curvature``: another damping's (default: this scorer's)."""
        return [_apply(c, dw.to(self.dtype)) for c, dw in zip(curvature or self._curvature, dws)]

    # ------------------------------------------------------------------ fitting
    def fit(self, store: GradientStore, collective: "Collective | None" = None) -> "CurvatureScorer":
        """Bind the store of train rows; it must come from this featurizer (else StoreMismatchError).
        collective: the store is this rank's shard (:func:`sketchattr.distributed.featurize`);
        every rank then prepares all queries, scores its shard, and ``score``/``top_k`` gather."""
        if collective is None and (store.metadata is None or len(store) == 0):
            raise ValueError("the store holds no rows: featurize a training set first")
        self._bind(store, collective)  # distributed: every rank learns which rank holds no rows, and stops
        store.metadata.check_matches(self.featurizer.metadata("train"))
        self.profiler = Profiler(enabled=True)
        return self

    # ------------------------------------------------------------------ queries
    def module_gradients(
        self, dataset: Any, kind: str = "query", indices: Sequence[int] | None = None
    ) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
        """Yield (dataset indices [B], per-block gradient matrices [B, *layout.shape]) of the
        measurement (``kind="query"``) or training-loss (``"train"``) gradients, batch by batch."""
        dataset = self._grad_featurizer._dataset_of(dataset)
        idx = self._grad_featurizer._resolve_indices(dataset, indices)
        rows_iter = self._grad_featurizer.iter_rows(dataset, idx, kind=kind)
        while True:
            with self.profiler.record(f"{kind} gradients"):
                item = next(rows_iter, None)
            if item is None:
                return
            b, rows = item
            yield b, self._block_matrices(rows)

    def prepare_queries(self, queries: Any, kind: str = "query", per_module: bool = False) -> PreparedQueries:
        """Queries in any accepted form (:mod:`sketchattr.score.queries`) as gradients preconditioned,
        rank-truncated (``query_rank``) and sketched with the store's projector: rows [n_query, m],
        reusable by every scoring call."""
        return self._prepared(queries, dict(kind=kind, per_module=per_module))

    def _prepare_dataset(self, queries: Any, kind: str = "query", per_module: bool = False,
                         curvatures: "Sequence[list[Curvature]] | None" = None) -> list[PreparedQueries]:
        """Gradients of query examples (a Dataset, DataLoader or tuple of tensors), preconditioned with
        each of ``curvatures`` (default: this scorer's) and sketched: one PreparedQueries per curvature,
        from one pass of query gradients."""
        if per_module and self.featurizer.projector.spec()["type"] != "identity":
            raise ValueError(
                "per_module scores need an identity-projected store: a random sketch mixes the "
                "modules' columns into one m-dimensional row"
            )
        curvatures = list(curvatures or [self._curvature])
        out: list[list] = [[] for _ in curvatures]
        for _, dws in self.module_gradients(queries, kind):
            for parts, curvature in zip(out, curvatures):
                parts.append(self._precondition_rows(dws, curvature, per_module))
        return [self._prepared_from(parts, per_module) for parts in out]

    def _precondition_rows(self, dws: Sequence[torch.Tensor], curvature: list[Curvature],
                           per_module: bool) -> "torch.Tensor | list[torch.Tensor]":
        """Per-block gradients [B, *shape] -> preconditioned, rank-truncated rows: sketched [B, m], or
        per module [B, d_k] (``per_module``)."""
        with self.profiler.record("precondition"):
            us = self._query_side(dws, curvature)
            if self.query_rank is not None:
                us = [low_rank(u, self.query_rank) for u in us]
            flat = self._flat_blocks(us)
        if per_module:
            return flat
        with self.profiler.record("project"):
            return self.featurizer.projector.project_query(flat)

    def _block_matrices(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Flat rows ``[B, d]`` (the featurizer's layout) -> per-block matrices ``[B, *layout.shape]``."""
        return [b.layout.from_flat(r) for b, r in zip(self.blocks, rows.split([b.dim for b in self.blocks], dim=1))]

    def _flat_blocks(self, mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-block matrices ``[B, *layout.shape]`` -> per-block flat rows ``[B, d_k]`` (inverse of the above)."""
        return [b.layout.to_flat(m) for b, m in zip(self.blocks, mats)]

    def _query_side(self, dws: Sequence[torch.Tensor], curvature: list[Curvature]) -> list[torch.Tensor]:
        """Per-block query gradients -> what is scored against the train rows (here M_k G per block;
        subclasses that solve with other curvature override this)."""
        return self.precondition(dws, curvature)

    def _prepared_from(self, parts: list, per_module: bool) -> PreparedQueries:
        meta = self.featurizer.metadata("query")
        if per_module:
            return PreparedQueries([torch.cat(p) for p in zip(*parts)], per_module=True, metadata=meta)
        return PreparedQueries(torch.cat(parts), metadata=meta)

    # ------------------------------------------------------------------ scoring
    def iter_scores(
        self, queries: Any, kind: str = "query", per_module: bool = False
    ) -> Iterator[tuple[np.ndarray, "torch.Tensor | dict[str, torch.Tensor]"]]:
        """Yield (train indices [b], scores [n_query, b]) block by block over the store
        (``per_module``: a dict module -> [n_query, b])."""
        self._check_fitted()
        prepared = self._prepared(queries, dict(kind=kind, per_module=per_module))
        dims = [b.dim for b in self.blocks]
        blocks = self.store.iter_blocks(self.block_rows)
        while True:
            with self.profiler.record("read store block"):
                item = next(blocks, None)
            if item is None:
                break
            idx, rows = item
            with self.profiler.record("score block"):
                dtype = self.score_dtype or (rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32)
                if prepared.per_module:
                    parts = rows.to(device=self.device, dtype=dtype).split(dims, dim=1)
                    block = {b.name: -u.to(dtype) @ g.T for b, u, g in zip(self.blocks, prepared.rows, parts)}
                else:
                    block = -self.featurizer.projector.inner(prepared.rows, rows.to(self.device), self.score_dtype)
            yield idx, block
        if self.profile:
            print(self.profiler.table(f"{type(self).__name__} scoring (cumulative since fit)"))

    def score_rows(self, queries: Any, rows: torch.Tensor) -> torch.Tensor:
        """−(P u_q)ᵀ r for train-side rows ``[n_rows, m]`` sketched with the store's projector:
        ``[n_query, n_rows]`` (queries: a dataset or :class:`PreparedQueries`)."""
        prepared = self._prepared(queries, {})
        if prepared.per_module:
            raise ValueError("score_rows takes total (not per-module) prepared queries")
        if rows.dim() != 2 or rows.shape[1] != self.store.dim:
            raise ValueError(f"rows must be [n, {self.store.dim}] (the store's width); got {tuple(rows.shape)}")
        return -self.featurizer.projector.inner(prepared.rows, rows.to(self.device), self.score_dtype)

    def score(self, queries: Any, **kwargs: Any) -> "torch.Tensor | dict[str, torch.Tensor]":
        """Scores [n_query, n_train] (``per_module=True``: dict module -> [n_query, n_train])."""
        blocks = [s for _, s in self.iter_scores(queries, **kwargs)]
        if isinstance(blocks[0], dict):
            return {k: self._gather_columns(torch.cat([b[k] for b in blocks], dim=1)) for k in blocks[0]}
        return self._gather_columns(torch.cat(blocks, dim=1))

    def score_grid(self, queries: Any, dampings: "Sequence[float | dict[str, float] | None]", kind: str = "query") -> torch.Tensor:
        """Scores for several dampings at once: [n_damping, n_query, n_train]. Each damping is what
        the constructor takes ("auto", None, a float λ or {module: λ}). The query
        gradients are computed once and the store is read once, so a sweep costs about one scoring
        call (what ``experiments/damping_rule.py`` uses for EKFAC's c·mean(Λ) grid).

        queries: the query examples or exact QueryRows (prepared queries carry one damping already)."""
        self._check_fitted()
        if not len(dampings):
            raise ValueError("dampings is empty: give at least one damping")
        if isinstance(queries, PreparedQueries):
            raise TypeError("score_grid preconditions the queries once per damping: pass the query examples or "
                            "exact QueryRows, not prepared queries (they are preconditioned with one damping)")
        names = [b.name for b in self.blocks]
        for d in dampings:
            _check_damping(d, names)
        prepared = self._prepare_raw(queries, kind, False, [self._damped(d)[0] for d in dampings])
        stacked = PreparedQueries(torch.cat([p.rows for p in prepared]), metadata=prepared[0].metadata)
        n_query = prepared[0].rows.shape[0]
        return self.score(stacked).reshape(len(dampings), n_query, -1)

    def top_k(self, queries: Any, k: int = 10, **kwargs: Any) -> TopK:
        if kwargs.get("per_module"):
            raise ValueError("top_k ranks total scores; per_module is for score()")
        return super().top_k(self._prepared(queries, kwargs), k)

    def score_to_hdf5(self, queries: Any, path: Any, dataset: str = "scores", k: int | None = None, **kwargs: Any) -> TopK | None:
        return super().score_to_hdf5(self._prepared(queries, kwargs), path, dataset, k)

    def self_influence(self, train_dataset: Any, indices: Sequence[int] | None = None, sketched: bool = False) -> torch.Tensor:
        """⟨M g_i, g_i⟩ ≥ 0 (summed over modules) for the store's rows (default; distributed:
        each rank computes its shard's, gathered) or ``indices`` of ``train_dataset``: [n].
        Recomputes those train gradients; ``sketched=True`` gives ⟨P M g_i, P g_i⟩, the
        diagonal of the sketched train-vs-train scores."""
        self._check_fitted()
        idx = self._local_indices() if indices is None else indices
        out = []
        for _, dws in self.module_gradients(train_dataset, "train", idx):
            us = self._query_side(dws, self._curvature)
            if sketched:
                proj = self.featurizer.projector
                out.append(proj.inner(proj.project_query(self._flat_blocks(us)), proj.project(self._flat_blocks([d.to(self.dtype) for d in dws]))).diagonal())
            else:
                out.append(sum((u * dw.to(self.dtype)).sum(dim=(1, 2)) for u, dw in zip(us, dws)))
        return torch.cat(out) if indices is not None else self._gather_columns(torch.cat(out), dim=0)

    def _prepared(self, queries: Any, kwargs: dict[str, Any]) -> PreparedQueries:
        """Any accepted query input (see :mod:`sketchattr.score.queries`) as preconditioned, sketched rows."""
        kind, per_module = kwargs.get("kind", "query"), kwargs.get("per_module", False)
        name = type(self).__name__
        if isinstance(queries, PreparedQueries):
            # against the bound store's metadata (checked against the featurizer at fit): no re-hash of the model per call
            mine = self.store.metadata if hasattr(self, "store") else self.featurizer.metadata("query")
            diff = [] if queries.metadata is None else sketch_differences(mine, queries.metadata)
            if diff:
                raise StoreMismatchError(f"{name}: these prepared queries come from another featurizer:\n  " + "\n  ".join(diff))
            return queries
        return self._prepare_raw(queries, kind, per_module)[0]

    def _prepare_raw(self, queries: Any, kind: str, per_module: bool,
                     curvatures: "Sequence[list[Curvature]] | None" = None) -> list[PreparedQueries]:
        """Query examples or exact QueryRows, preconditioned with each of ``curvatures`` (default: this
        scorer's) and sketched: one PreparedQueries per curvature."""
        if isinstance(queries, QueryRows):
            return self._prepare_rows(queries, per_module, curvatures)
        if is_dataset_like(queries):
            return self._prepare_dataset(queries, kind, per_module, curvatures)
        name = type(self).__name__
        raise TypeError(
            f"{name} preconditions raw query gradients, so it takes the query examples (a Dataset, a DataLoader or a "
            f"tuple of tensors), its own prepare_queries(...) output, or QueryRows of an identity featurizer; got "
            f"{type(queries).__name__}"
        )

    def _prepare_rows(self, queries: QueryRows, per_module: bool,
                      curvatures: "Sequence[list[Curvature]] | None" = None) -> list[PreparedQueries]:
        """Exact query gradients (QueryRows of an identity featurizer with these modules) preconditioned
        and sketched (one PreparedQueries per curvature): a random sketch cannot be preconditioned after the fact."""
        name, mine = type(self).__name__, self.featurizer.metadata("query")
        if queries.metadata is not None:
            if queries.metadata.projector.get("type") != "identity":
                raise TypeError(
                    f"{name} preconditions raw gradients before sketching; these query rows are already sketched "
                    f"({queries.metadata.projector.get('type')}, m={queries.metadata.dim}). Pass the query examples "
                    "themselves (a Dataset, DataLoader or tuple of tensors)"
                )
            exact = StoreMetadata(**{**mine.__dict__, "projector": queries.metadata.projector, "dim": queries.metadata.dim})
            diff = sketch_differences(exact, queries.metadata)
            if diff:
                raise StoreMismatchError(f"{name}: the query gradients come from another model, task or module set:\n  "
                                         + "\n  ".join(diff))
        dims = [b.dim for b in self.blocks]
        if queries.rows.shape[1] != sum(dims):
            raise ValueError(f"{name}: exact query gradients must be [n_query, {sum(dims)}] (the modules' parameters), "
                             f"got {tuple(queries.shape)}")
        dws = self._block_matrices(queries.rows.to(self.device))
        return [self._prepared_from([self._precondition_rows(dws, c, per_module)], per_module)
                for c in (curvatures or [self._curvature])]


class EKFACScorer(CurvatureScorer, name="ekfac"):
    """EKFAC influence: eigenbases of A and S, eigenvalues refitted per coordinate."""

    curvature_kind = "ekfac"


class KFACScorer(CurvatureScorer, name="kfac"):
    """KFAC influence: Λ = λ_S λ_Aᵀ (works with KFAC or EKFAC factors)."""

    curvature_kind = "kfac"


class DiagonalScorer(CurvatureScorer, name="diagonal"):
    """Diagonal-Fisher influence: DW_q ⊘ (E[DW²] + λ)."""

    curvature_kind = "diagonal"


class IdentityScorer(CurvatureScorer, name="identity"):
    """No curvature (M = I): scores = −(P DW_q)ᵀ ĝ_i, a gradient dot product on the store."""

    curvature_kind = None

    def __init__(self, featurizer: Featurizer, **kwargs: Any) -> None:
        super().__init__(None, featurizer, **kwargs)


# ---------------------------------------------------------------------------- helpers
def _apply(curvature: Curvature, dw: torch.Tensor) -> torch.Tensor:
    """Q_S[(Q_Sᵀ G Q_A) ⊘ D]Q_Aᵀ (a None basis is the identity), G without curvature. [B, r, c]."""
    qs, qa, denom = curvature
    if denom is None:
        return dw
    u = rotate(dw, qs, qa) / denom
    if qa is not None:
        u = u @ qa.T
    if qs is not None:
        u = qs @ u
    return u


def low_rank(u: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of each matrix (truncated SVD): [B, o, i] -> [B, o, i]."""
    U, S, Vh = torch.linalg.svd(u, full_matrices=False)
    return (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]


def _check_factors(factors: Factors, featurizer: Featurizer) -> None:
    problems = []
    blocks = featurizer.engine.blocks
    if list(factors.modules) != [b.name for b in blocks]:
        problems.append(f"modules: factors have {list(factors.modules)}, featurizer selects {[b.name for b in blocks]}")
    elif factors.layouts != {b.name: b.layout for b in blocks}:
        problems.append(f"layouts: factors have {factors.layouts}, model has {({b.name: b.layout for b in blocks})}")
    fp = model_fingerprint(featurizer.model)
    if factors.metadata["model_fingerprint"] != fp:
        problems.append(f"model_fingerprint: factors have {factors.metadata['model_fingerprint']!r}, model has {fp!r}")
    if problems:
        raise FactorsMismatchError("the factors were fitted on another model or module set:\n  " + "\n  ".join(problems))


def query_rank_agreement(scorer: CurvatureScorer, queries: Any, ranks: Sequence[int]) -> dict[int, dict[str, float]]:
    """How well rank-k query truncation reproduces full-rank scores.

    Returns {k: {"pearson": mean over queries of Pearson(scores_k[q], scores_full[q]),
    "spearman": the same with Spearman, "rel_error": ‖S_k − S‖_F / ‖S‖_F}}.
    """
    def scores_at(rank: int | None) -> np.ndarray:
        s = copy.copy(scorer)
        s.query_rank, s.profile = rank, False
        return s.score(queries).double().cpu().numpy()

    full = scores_at(None)
    out = {}
    for k in ranks:
        approx = scores_at(k)
        out[k] = {
            "pearson": float(np.mean([np.corrcoef(a, f)[0, 1] for a, f in zip(approx, full)])),
            "spearman": float(np.mean([scipy.stats.spearmanr(a, f)[0] for a, f in zip(approx, full)])),
            "rel_error": float(np.linalg.norm(approx - full) / np.linalg.norm(full)),
        }
    return out


def _check_damping(damping: Any, names: Sequence[str]) -> None:
    """damping: "auto", None, a float > 0, or {module name: float > 0} covering every attributed module."""
    def positive(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x)) and x > 0

    if damping is None or positive(damping) or (isinstance(damping, str) and damping == "auto"):
        return
    if isinstance(damping, dict):
        missing = sorted(set(names) - set(damping))
        bad = {k: v for k, v in damping.items() if not positive(v)}
        extra = sorted(set(damping) - set(names))
        if not (missing or bad or extra):
            return
        raise ValueError(f"per-module damping must give a finite float > 0 for each attributed module; "
                         f"missing {missing}, not finite > 0 {bad}, unknown modules {extra}")
    raise ValueError(f"damping must be 'auto' (max eigenvalue / 3e4 per module), None (0.1·mean eigenvalue per "
                     f"module), a finite float > 0, or {{module: float > 0}}; got {damping!r}")

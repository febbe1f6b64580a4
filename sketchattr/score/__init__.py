"""Scorers: fit once on a gradient store, then score many query batches.

``SketchedInfluence`` (regularized sketched influence, automatic damping), the EKFAC family
(``EKFACScorer``, ``KFACScorer``, ``DiagonalScorer``, ``IdentityScorer``), ``TracIn`` and
``EnsembleInfluence``, ``SourceInfluence`` (training-aware), ``RefinedInfluence`` (EKFAC refined by
exact Gauss-Newton products), all with ``score`` ``[n_query, n_train]``, streaming ``top_k``,
``score_to_hdf5`` and ``self_influence``; per-token scores, LESS-style data selection and a faiss
index over a store. Every scorer reads its queries one way (:mod:`.queries`).

May import :mod:`sketchattr.curvature`, :mod:`sketchattr.distributed` and below.
"""
from sketchattr.score.base import Scorer
from sketchattr.score.damping import auto_damping, effective_dimension
from sketchattr.score.sketched_influence import SketchedInfluence
from sketchattr.score.topk import TopK, top_k

__all__ = ["Scorer", "SketchedInfluence", "TopK", "top_k", "auto_damping", "effective_dimension"]

from sketchattr.score.ekfac import (  # noqa: E402  (factored-curvature scorers)
    CurvatureScorer, DiagonalScorer, EKFACScorer, IdentityScorer, KFACScorer, PreparedQueries, query_rank_agreement,
)

__all__ += [
    "CurvatureScorer", "DiagonalScorer", "EKFACScorer", "IdentityScorer", "KFACScorer", "PreparedQueries",
    "query_rank_agreement",
]

from sketchattr.score.tracin import TracIn, TracInQueries, tracin_from_checkpoints  # noqa: E402

__all__ += ["TracIn", "TracInQueries", "tracin_from_checkpoints"]

from sketchattr.score.per_token import TokenScores, per_token_scores  # noqa: E402
from sketchattr.score.selection import Selection, aggregate_scores, select_training_data  # noqa: E402

__all__ += ["Selection", "TokenScores", "aggregate_scores", "per_token_scores", "select_training_data"]

from sketchattr.score.queries import QueryMismatchError, QueryRows  # noqa: E402
from sketchattr.score.retrieval import InfluenceIndex  # noqa: E402  (faiss is imported only when an index is built)

__all__ += ["InfluenceIndex", "QueryMismatchError", "QueryRows"]

from sketchattr.score.ensemble import EnsembleInfluence, EnsembleQueries, featurize_members  # noqa: E402

__all__ += ["EnsembleInfluence", "EnsembleQueries", "featurize_members"]

from sketchattr.score.ekfac_ensemble import ekfac_ensemble  # noqa: E402

__all__ += ["ekfac_ensemble"]

from sketchattr.score.source import Segment, SourceInfluence, source_from_checkpoints  # noqa: E402

__all__ += ["Segment", "SourceInfluence", "source_from_checkpoints"]

from sketchattr.score.refined import RefinedInfluence, refined_damping  # noqa: E402

__all__ += ["RefinedInfluence", "refined_damping"]

"""sketchattr: training-data attribution with regularized sketched influence functions.

Quick path: ``Featurizer(model, task, projector="sjlt", m=1024).featurize(train_set)`` → a store;
``SketchedInfluence().fit(store).top_k(featurizer.query_rows(query_set), k=5)``.

The package reads like the pipeline, bottom to top (each stage imports only those below it;
ARCHITECTURE.md): :mod:`.core` (shared types), :mod:`.task` and :mod:`.data` (what to
differentiate, users' data), :mod:`.project` and :mod:`.sample` (sketches, samplers),
:mod:`.store`, :mod:`.featurize`, :mod:`.distributed`, :mod:`.curvature`, :mod:`.score`,
:mod:`.validate`, :mod:`.integrations`, then :mod:`.bench` (the bench zoo) and :mod:`.cli` (the
``sketchattr`` command). The public names are re-exported here.
"""
from sketchattr.featurize import Featurizer, IndexedDataset, NonFiniteGradientError, TrainTimeSketcher, model_fingerprint
from sketchattr.featurize.selection import ModuleSelection, select_modules
from sketchattr.project import (
    FactGraSSProjector,
    FactorizedProjector,
    GaussianProjector,
    IdentityProjector,
    Projector,
    RademacherProjector,
    SJLTProjector,
    TensorSketchProjector,
    make_projector,
)
from sketchattr.score import Scorer, SketchedInfluence, TopK, top_k
from sketchattr.sample import make_sampler
from sketchattr.store import (
    CPUStore,
    DiskStore,
    GradientStore,
    MemoryStore,
    StoreCorruptedError,
    StoreLockedError,
    StoreWriteError,
    StoreMetadata,
    StoreMismatchError,
    make_store,
)
from sketchattr.task import CausalLMTask, ClassificationTask, LossTask, RegressionTask, SequenceClassificationTask, Task
from sketchattr.featurize.selection import last_blocks
from sketchattr.data.collate import PadCollator
from sketchattr.featurize.preconditioner import AdamPreconditioner

__version__ = "0.1.0"

__all__ = [
    "IndexedDataset", "TrainTimeSketcher", "AdamPreconditioner", "CausalLMTask", "LossTask", "PadCollator", "SequenceClassificationTask", "last_blocks",
    "EigenbasisProjector", "SparseEigenbasisProjector", "CPUStore", "DiskStore", "StoreCorruptedError", "StoreLockedError", "StoreWriteError", "make_sampler", "make_store",
    "ClassificationTask", "FactGraSSProjector", "FactorizedProjector", "Featurizer", "GaussianProjector", "GradientStore", "IdentityProjector",
    "MemoryStore", "ModuleSelection", "NonFiniteGradientError", "Projector", "RademacherProjector",
    "RegressionTask", "SJLTProjector", "TensorSketchProjector", "Scorer", "SketchedInfluence", "StoreMetadata",
    "StoreMismatchError", "Task", "TopK", "make_projector", "model_fingerprint", "select_modules", "top_k",
]

from sketchattr.curvature import EigenbasisProjector, Factors, FactorsMismatchError, SparseEigenbasisProjector, fit_factors  # noqa: E402
from sketchattr.score import DiagonalScorer, EKFACScorer, IdentityScorer, KFACScorer  # noqa: E402

__all__ += ["DiagonalScorer", "EKFACScorer", "Factors", "FactorsMismatchError", "IdentityScorer", "KFACScorer", "fit_factors"]

from sketchattr.score import TracIn, tracin_from_checkpoints  # noqa: E402

__all__ += ["TracIn", "tracin_from_checkpoints"]

from sketchattr.score import Selection, TokenScores, aggregate_scores, per_token_scores, select_training_data  # noqa: E402

__all__ += ["Selection", "TokenScores", "aggregate_scores", "per_token_scores", "select_training_data"]

from sketchattr.score import InfluenceIndex, QueryMismatchError, QueryRows  # noqa: E402
from sketchattr.integrations.kronfluence import KronfluenceTask  # noqa: E402

__all__ += ["InfluenceIndex", "KronfluenceTask", "QueryMismatchError", "QueryRows"]

from sketchattr.score import EnsembleInfluence, ekfac_ensemble, featurize_members  # noqa: E402

__all__ += ["EnsembleInfluence", "ekfac_ensemble", "featurize_members"]

from sketchattr.score import RefinedInfluence, Segment, SourceInfluence, refined_damping, source_from_checkpoints  # noqa: E402

__all__ += ["RefinedInfluence", "Segment", "SourceInfluence", "refined_damping", "source_from_checkpoints"]

"""Kronecker-factored (KFAC, EKFAC) and diagonal curvature of every block the hook engine covers.

Conventions (N = number of training examples used, t = positions; the statistics come from the
hook engine, :mod:`sketchattr.featurize.engine`, so a Task's mask keeps padding out of all of
them). A Kronecker block's per-example gradient is a matrix ``G_i = Σ_t row_t col_tᵀ``
``[rows(+1), cols(+1)]`` (:class:`~sketchattr.featurize.rules.KronLayout`: for Linear/Conv the
rows are output channels and the columns inputs, ``G = DW``; transformers' Conv1D and
Embedding store the weight the other way round):

* ``A = (1/N) Σ_i Σ_t col_t col_tᵀ`` and ``S = (1/N) Σ_i Σ_t row_t row_tᵀ``: sums over
  positions averaged over *examples* (for T = 1, as in an MLP, A ⊗ S is the usual KFAC
  estimate of E[vec G vec Gᵀ]). For an Embedding the one-hot side is exactly diagonal (token
  counts) and kept as a vector: its eigenbasis is the identity and no ``Q`` is stored.
* ``eigen``: ``A = Q_A diag(λ_A) Q_Aᵀ``, ``S = Q_S diag(λ_S) Q_Sᵀ`` in float64 (eigenvalues
  clamped at 0). KFAC's eigenvalues are ``Λ = λ_S λ_Aᵀ`` ``[rows(+1), cols(+1)]``.
* ``correction`` (EKFAC): ``Λ = (1/N) Σ_i (Q_Sᵀ G_i Q_A)^∘2`` — a second pass over the data.
* ``diagonal``: ``Λ = (1/N) Σ_i G_i^∘2`` in the parameter basis (one pass, no eigenbases).
* Blocks without Kronecker structure (norm weights, a lone bias) get the diagonal ``Λ`` ``[1, d]``
  under every kind (computed in the first pass).

Fisher: ``"true"`` (default) samples targets from the model (``task.train_loss(...,
sample=True)``). Every batch is seeded (the global RNG state is restored afterwards) from the
pass and its global batch index, ``batch_seed(seed, pass, b)``, so a refit is
reproducible and the labels do not depend on how batches are spread over processes
(``collective=``); they do depend on ``batch_size`` (recorded as ``label_batch_size``). The
covariance and diagonal passes use ``pass_seed(seed, 0) = seed``, the correction pass
``pass_seed(seed, 1)``, i.e. *fresh* labels. Reusing the covariance pass's labels would fit
Λ to the very sample the eigenbases were fitted to and shrink it in the small-eigenvalue
directions (on digits-mlp the median EKFAC Λ of the first layer fell 14×, and LDS at λ = 1e-8
from 0.52 to 0.29); Kronfluence also draws fresh labels for its correction pass. ``"empirical"`` uses the data's targets. The first
``max_examples`` rows of the dataset are used (all by default), in the model's eval mode.

Distributed (``collective=``, see :mod:`sketchattr.distributed`): each rank passes over a
contiguous, batch-aligned shard of those rows; the per-module sums are all-reduced, so every
rank ends with the single-process factors (to float summation order). Rank 0 saves the stages;
a stage is loaded only if every rank can read it.

Stages (``kfac``: covariance → eigen; ``ekfac``: covariance → eigen → correction;
``diagonal``: diagonal) are computed by :mod:`.passes` and saved under ``path`` as ``<stage>.pt``
(format in :mod:`.stages`). A refit loads the finished stages and computes the rest (a recomputed
stage invalidates the later ones); files whose metadata (model fingerprint, modules, kind, fisher,
examples, seed, dtype, task) differ raise
:class:`~sketchattr.curvature.stages.FactorsMismatchError` unless ``overwrite=True``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sketchattr.core.batches import as_dataset, dataset_length, main_process, tree_map
from sketchattr.core.profiler import Profiler
from sketchattr.curvature.passes import STAGE_FNS, Run, caster
from sketchattr.curvature.stages import STAGES, check_existing, load_stage, merge, save_stage, stage_files
from sketchattr.featurize.engine import HookEngine
from sketchattr.featurize.passes import example_runner
from sketchattr.featurize.plan import Block
from sketchattr.featurize.fingerprint import model_fingerprint
from sketchattr.featurize.rules import BlockLayout, layout_from
from sketchattr.featurize.selection import select_modules, unwrap_model
from sketchattr.task import Task, validate_task

if TYPE_CHECKING:
    from sketchattr.distributed.collective import Collective

FISHERS = ("true", "empirical")
FORMAT = "sketchattr-factors"


@dataclass
class Factors:
    """Fitted curvature factors.

    kind: ``"ekfac"``, ``"kfac"`` or ``"diagonal"``. metadata: JSON-able settings (see module
    docstring); ``metadata["blocks"]`` holds each block's name, parameters and layout.
    tensors: ``{module: {"A", "S", "QA", "LA", "QS", "LS", "Lambda"}}`` (those the kind and the
    block have: no ``QS`` for a diagonal side, only ``Lambda`` for a block without Kronecker
    structure).
    computed / loaded: stages computed or read from ``path`` by the call that made this object.
    profiler: the per-stage timings.
    """

    kind: str
    metadata: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    computed: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    profiler: Profiler = field(default_factory=lambda: Profiler(enabled=False))

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.metadata["modules"])

    @property
    def layouts(self) -> dict[str, BlockLayout]:
        """{module: matrix layout of its block}."""
        return {name: layout_from(lay) for name, _, lay in self.metadata["blocks"]}

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the factor tensors (float64 by default)."""
        return next(t for module in self.tensors.values() for t in module.values()).dtype

    @property
    def n_examples(self) -> int:
        return int(self.metadata["n_examples"])

    def curvature(self, module: str, kind: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(Q_S [rows, rows] | None, Q_A [cols, cols] | None, Λ [rows, cols]) (with bias coordinates).

        kind: how to read the factors (default: ``self.kind``); ``"kfac"`` also works on
        EKFAC factors (same eigenbases, Λ = λ_S λ_Aᵀ). A basis is None where it is the identity
        (``"diagonal"``, an Embedding's one-hot side, blocks without Kronecker structure).
        """
        kind = kind or self.kind
        t = self.tensors[module]
        if "LS" not in t and "Lambda" in t and kind in ("ekfac", "kfac", "diagonal") and (kind == "diagonal") == (self.kind == "diagonal"):
            return None, None, t["Lambda"]  # diagonal curvature (kind "diagonal", or a flat block)
        if kind == "kfac" and "LS" in t:
            return t.get("QS"), t.get("QA"), torch.outer(t["LS"], t["LA"])
        if kind == self.kind == "ekfac":
            return t.get("QS"), t.get("QA"), t["Lambda"]
        raise ValueError(f"{self.kind} factors cannot be used as {kind!r} curvature")

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Factors":
        """Read the complete factors saved under ``path`` by :func:`fit_factors`."""
        files = [f for f in stage_files(path).values() if f.exists()]
        if not files:
            raise FileNotFoundError(f"no saved factor stages under {path}")
        meta = json.loads(torch.load(files[0], weights_only=True)["metadata"])
        kind, tensors, loaded = meta["kind"], {}, []
        for stage in STAGES[kind]:
            saved = load_stage(stage_files(path)[stage], stage, meta, overwrite=False)
            if saved is None:
                raise FileNotFoundError(f"stage {stage!r} of {kind} factors is missing under {path}: refit with fit_factors(path=...)")
            merge(tensors, saved)
            loaded.append(stage)
        return cls(kind, meta, tensors, loaded=loaded)


# ---------------------------------------------------------------------------- fitting
def fit_factors(
    model: nn.Module,
    task: Task,
    train_dataset: Any,
    kind: str = "ekfac",
    modules: Any = None,
    fisher: str = "true",
    max_examples: int | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    path: "str | os.PathLike[str] | None" = None,
    overwrite: bool = False,
    progress: bool = True,
    profile: bool = False,
    collective: "Collective | None" = None,
    collate_fn: Callable[[list], Any] | None = None,
) -> Factors:
    """Fit ``kind`` curvature factors of the selected modules on ``train_dataset``.

    Every selected module (and every module sharing its parameters) needs a layer rule
    (Linear, transformers' Conv1D, Conv1d/Conv2d, Embedding, elementwise norms); a Task's
    :meth:`~sketchattr.task.Task.mask` keeps padded positions out of every statistic.

    modules: as for :class:`~sketchattr.Featurizer` (default ``task.modules`` or all); use the
    featurizer's selection so the scorer can pair them. fisher: ``"true"`` | ``"empirical"``.
    path: a folder for the stage files (resume; see module docstring). profile: print the
    per-stage timing table at the end (``factors.profiler`` holds it either way).
    collective: fit across processes, each over its shard (see module docstring); a
    DistributedDataParallel-wrapped model is unwrapped. collate_fn: as for the featurizer
    (e.g. :class:`~sketchattr.data.collate.PadCollator` for token sequences).
    """
    if kind not in STAGES:
        raise ValueError(f"kind must be one of {sorted(STAGES)}, got {kind!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    task = validate_task(task)
    model = unwrap_model(model)
    dataset = as_dataset(train_dataset)
    n = _n_examples(dataset, max_examples)
    engine = _resolve_engine(model, task, modules, dataset, collate_fn)
    meta = _metadata(model, task, engine.blocks, kind, fisher, n, len(dataset), max_examples, seed, dtype)
    meta["label_batch_size"] = batch_size if fisher == "true" else None
    profiler = Profiler(enabled=True)
    main = collective is None or collective.is_main
    run = Run(model, task, dataset, n, engine, batch_size, dtype, seed, fisher == "true", progress and main_process(), profiler,
               collective, collate_fn)
    files = stage_files(path) if path is not None else {}
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        check_existing(files, meta, overwrite)
    tensors: dict[str, dict[str, torch.Tensor]] = {b.name: {} for b in engine.blocks}
    computed: list[str] = []
    loaded: list[str] = []
    for stage in STAGES[kind]:
        saved = None
        if files and not computed and not overwrite:
            with profiler.record("load stage"):
                saved = load_stage(files[stage], stage, meta, overwrite)
            if collective is not None and not all(collective.gather_objects(saved is not None)):
                saved = None  # a rank cannot read it: recompute together
        if saved is not None:
            loaded.append(stage)
        else:
            with profiler.record(f"stage: {stage}"):
                saved = STAGE_FNS[stage](run, tensors)
            computed.append(stage)
            if files and main:
                with profiler.record("save stage"):
                    save_stage(files[stage], stage, meta, saved)
        merge(tensors, saved)
    if profile:
        print(profiler.table(f"fit_factors ({kind}, {fisher} Fisher, {n} examples)"))
    return Factors(kind, meta, tensors, computed, loaded, profiler)


def _n_examples(dataset: Dataset, max_examples: int | None) -> int:
    n = dataset_length(dataset, "train dataset")
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        n = min(n, int(max_examples))
    return n


CURVATURE = "EKFAC/KFAC/diagonal curvature"
CURVATURE_REMEDY = "Select modules that have rules with modules=[...], or use SketchedInfluence, which works for any module."


def _resolve_engine(model: nn.Module, task: Task, modules: Any, dataset: Dataset, collate_fn: Any = None) -> HookEngine:
    spec = modules if modules is not None else getattr(task, "modules", None)
    example = None
    if isinstance(spec, int) and not isinstance(spec, bool):
        first = next(iter(DataLoader(Subset(dataset, [0]), batch_size=1, generator=torch.Generator(), collate_fn=collate_fn)))
        example = example_runner(task, tree_map(caster(model), first))
    engine = HookEngine(model, select_modules(model, spec, example))
    engine.require(CURVATURE, CURVATURE_REMEDY)
    return engine


def _metadata(model: nn.Module, task: Task, blocks: list[Block], kind: str, fisher: str, n: int, n_dataset: int,
              max_examples: int | None, seed: int, dtype: torch.dtype) -> dict[str, Any]:
    """The settings a saved stage must match to be reused (see the module docstring)."""
    return {
        "format": FORMAT,
        "version": 2,
        "kind": kind,
        "fisher": fisher,
        "modules": [b.name for b in blocks],
        "blocks": [[b.name, list(b.param_names), b.layout.describe()] for b in blocks],
        "model_fingerprint": model_fingerprint(model),
        "task": task.describe(),
        "n_examples": n,
        "n_dataset": n_dataset,
        "max_examples": max_examples,
        "seed": seed,
        "dtype": str(dtype),
    }

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
``diagonal``: diagonal) are saved under ``path`` as ``<stage>.pt`` (``torch.save`` of
``{"stage", "metadata" (JSON text), "tensors": {module: {name: tensor}}}``, read back with
``torch.load(weights_only=True)``), written atomically. A refit loads the finished stages and
computes the rest (a recomputed stage invalidates the later ones); files whose metadata (model
fingerprint, modules, kind, fisher, examples, seed, dtype, task) differ raise
:class:`FactorsMismatchError` unless ``overwrite=True``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from sketchattr.core.batches import as_dataset, batch_len, dataset_length, first_example, main_process, tree_map
from sketchattr.core.profiler import Profiler
from sketchattr.featurize.engine import BatchCapture, Block, HookEngine
from sketchattr.featurize.featurizer import example_runner, task_mask
from sketchattr.featurize.fingerprint import model_fingerprint
from sketchattr.featurize.rules import BlockLayout, layout_from
from sketchattr.featurize.selection import select_modules, unwrap_model
from sketchattr.task import Task, validate_task

if TYPE_CHECKING:
    from sketchattr.distributed.collective import Collective

STAGES: dict[str, tuple[str, ...]] = {
    "kfac": ("covariance", "eigen"),
    "ekfac": ("covariance", "eigen", "correction"),
    "diagonal": ("diagonal",),
}
FISHERS = ("true", "empirical")
FORMAT = "sketchattr-factors"


class FactorsMismatchError(ValueError):
    """Saved factors were fitted with other settings (model, modules, kind, Fisher, ...)."""


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
        files = [f for f in _stage_files(path).values() if f.exists()]
        if not files:
            raise FileNotFoundError(f"no saved factor stages under {path}")
        meta = json.loads(torch.load(files[0], weights_only=True)["metadata"])
        kind, tensors, loaded = meta["kind"], {}, []
        for stage in STAGES[kind]:
            saved = _load_stage(_stage_files(path)[stage], stage, meta, overwrite=False)
            if saved is None:
                raise FileNotFoundError(f"stage {stage!r} of {kind} factors is missing under {path}: refit with fit_factors(path=...)")
            _merge(tensors, saved)
            loaded.append(stage)
        return cls(kind, meta, tensors, loaded=loaded)


# ---------------------------------------------------------------------------- fitting
@dataclass
class _Run:
    """Everything a data pass needs."""

    model: nn.Module
    task: Task
    dataset: Dataset
    n: int
    engine: HookEngine
    batch_size: int
    dtype: torch.dtype
    seed: int
    sample: bool
    progress: bool
    profiler: Profiler
    collective: "Collective | None" = None
    collate_fn: Callable[[list], Any] | None = None

    @property
    def blocks(self) -> list[Block]:
        return self.engine.blocks

    @property
    def rows(self) -> range:
        """This process's rows of ``range(n)`` (all of them without a collective)."""
        if self.collective is None:
            return range(self.n)
        part = self.collective.shard(self.n, self.batch_size)
        return range(part.start, part.stop)


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
    run = _Run(model, task, dataset, n, engine, batch_size, dtype, seed, fisher == "true", progress and main_process(), profiler,
               collective, collate_fn)
    files = _stage_files(path) if path is not None else {}
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        _check_existing(files, meta, overwrite)
    tensors: dict[str, dict[str, torch.Tensor]] = {b.name: {} for b in engine.blocks}
    computed: list[str] = []
    loaded: list[str] = []
    for stage in STAGES[kind]:
        saved = None
        if files and not computed and not overwrite:
            with profiler.record("load stage"):
                saved = _load_stage(files[stage], stage, meta, overwrite)
            if collective is not None and not all(collective.gather_objects(saved is not None)):
                saved = None  # a rank cannot read it: recompute together
        if saved is not None:
            loaded.append(stage)
        else:
            with profiler.record(f"stage: {stage}"):
                saved = _STAGE_FNS[stage](run, tensors)
            computed.append(stage)
            if files and main:
                with profiler.record("save stage"):
                    _save_stage(files[stage], stage, meta, saved)
        _merge(tensors, saved)
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
        example = example_runner(task, tree_map(_caster(model), first))
    engine = HookEngine(model, select_modules(model, spec, example))
    engine.require(CURVATURE, CURVATURE_REMEDY)
    return engine


def _metadata(model, task, blocks, kind, fisher, n, n_dataset, max_examples, seed, dtype) -> dict[str, Any]:
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


def _caster(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    p = next(model.parameters())

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=p.device, dtype=p.dtype if t.is_floating_point() else t.dtype)

    return cast


def pass_seed(seed: int, pass_index: int) -> int:
    """Seed of data pass ``pass_index`` (0: covariance/diagonal, 1: correction)."""
    if pass_index == 0:
        return seed
    return int(np.random.SeedSequence([seed, pass_index]).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


def batch_seed(seed: int, pass_index: int, batch_index: int) -> int:
    """Seed of global batch ``batch_index`` of data pass ``pass_index`` (batch 0: the pass's
    seed, so a one-batch pass samples as ``torch.manual_seed(pass_seed(seed, pass_index))``)."""
    if batch_index == 0:
        return pass_seed(seed, pass_index)
    state = np.random.SeedSequence([seed, pass_index, batch_index]).generate_state(1, np.uint64)[0]
    return int(state & ((1 << 63) - 1))


def _data_pass(run: _Run, desc: str, consume: Callable[[BatchCapture], None], pass_index: int = 0) -> None:
    """One pass over this process's rows of the first ``run.n`` examples: ``consume(capture)`` per
    batch (:class:`~sketchattr.featurize.engine.BatchCapture` of the training loss, the Task's mask
    applied). Seeds the global RNG per batch with ``batch_seed(run.seed, pass_index, global batch
    index)`` (restored afterwards). The first batch is checked against plain autograd."""
    model, prof, task = run.model, run.profiler, run.task
    rows = run.rows
    # own generator: the DataLoader's base-seed draw must not consume the seeded global RNG
    loader = DataLoader(Subset(run.dataset, rows), batch_size=run.batch_size, shuffle=False, generator=torch.Generator(),
                        collate_fn=run.collate_fn)
    first_batch = rows.start // run.batch_size
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    was_training = model.training
    model.eval()
    cast = _caster(model)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            with run.engine.attached() as engine:
                for b, batch in enumerate(tqdm(loader, desc=desc, unit="batch", disable=not run.progress)):
                    torch.manual_seed(batch_seed(run.seed, pass_index, first_batch + b))
                    batch = tree_map(cast, batch)
                    n, mask = batch_len(batch), task_mask(task, batch, device)
                    with prof.record("forward + backward"):
                        cap = engine.run(lambda: task.train_loss(model, batch, sample=run.sample), n, mask)
                    if b == 0:
                        check = engine.run(lambda: task.train_loss(model, batch), n, mask) if run.sample else cap
                        engine.verify(check, lambda: task.train_loss(model, first_example(batch)), params)
                    with prof.record(f"accumulate ({desc})"):
                        consume(cap)
    finally:
        model.train(was_training)


Terms = Callable[[int, BatchCapture], dict[str, torch.Tensor]]


def _sum_over_data(run: _Run, desc: str, terms: Terms, zeros: Callable[[int], dict[str, torch.Tensor]], pass_index: int = 0) -> dict:
    """{module: {name: (1/N) Σ_batches terms(k, capture)[name]}} over the blocks k that ``terms``
    returns entries for; ``zeros(k)``: the entries of a rank without rows (distributed)."""
    sums: dict[str, dict[str, torch.Tensor]] = {b.name: {} for b in run.blocks}

    def consume(cap: BatchCapture) -> None:
        for k, block in enumerate(run.blocks):
            for key, value in terms(k, cap).items():
                acc = sums[block.name]
                acc[key] = acc[key] + value if key in acc else value

    _data_pass(run, desc, consume, pass_index)
    if run.collective is not None:
        for k, block in enumerate(run.blocks):
            acc = sums[block.name]
            if not acc:  # no rows on this rank
                acc.update(zeros(k))
            for key in sorted(acc):
                acc[key] = run.collective.sum(acc[key])
    return {name: {k: v / run.n for k, v in acc.items()} for name, acc in sums.items() if acc}


def _zeros(run: _Run, shape_of: Callable[[Block], dict[str, tuple[int, ...]]]) -> Callable[[int], dict[str, torch.Tensor]]:
    device = next(run.model.parameters()).device
    return lambda k: {key: torch.zeros(shape, dtype=run.dtype, device=device) for key, shape in shape_of(run.blocks[k]).items()}


def _matrices(run: _Run, cap: BatchCapture, k: int) -> torch.Tensor:
    """Block k's per-example gradients as matrices ``[B, *layout.shape]`` in ``run.dtype``."""
    return run.blocks[k].layout.from_flat(cap.grads(k).to(run.dtype))


def _gram(factor: Any, diagonal: bool, dtype: torch.dtype) -> torch.Tensor:
    g = factor.to(dtype).gram()
    return torch.diag(g) if g.dim() == 1 and not diagonal else g


def _covariance_stage(run: _Run, tensors: dict) -> dict:
    def terms(k: int, cap: BatchCapture) -> dict[str, torch.Tensor]:
        block = run.blocks[k]
        if not block.kronecker:
            return {"Lambda": (_matrices(run, cap, k) ** 2).sum(dim=0)}
        out: dict[str, torch.Tensor] = {}
        for row, col in cap.factors(k):
            a, s = _gram(col, False, run.dtype), _gram(row, block.diagonal_rows, run.dtype)
            out["A"] = out["A"] + a if "A" in out else a
            out["S"] = out["S"] + s if "S" in out else s
        return out

    def shapes(block: Block) -> dict[str, tuple[int, ...]]:
        if not block.kronecker:
            return {"Lambda": block.layout.shape}
        r, c = block.layout.shape
        return {"A": (c, c), "S": (r,) if block.diagonal_rows else (r, r)}

    return _sum_over_data(run, "covariance", terms, _zeros(run, shapes))


def _eigen_stage(run: _Run, tensors: dict) -> dict:
    out = {}
    names = [name for name, t in tensors.items() if "A" in t]  # no A: a block without Kronecker structure (Λ done)
    bar = tqdm(names, desc="eigendecomposition", unit="module", disable=not run.progress)
    with run.profiler.record("eigendecomposition"):
        for name in bar:
            t = tensors[name]
            n = max(t[s].shape[0] for s in ("A", "S") if t[s].dim() == 2)  # eigh is O(n³) in the larger side
            bar.set_postfix_str(f"{name} ({n}×{n})", refresh=True)
            out[name] = {}
            for side in ("A", "S"):
                vals, vecs = _eigh(t[side])
                out[name]["L" + side] = vals.to(run.dtype)
                if vecs is not None:
                    out[name]["Q" + side] = vecs.to(run.dtype)
    return out


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eigenvalues clamped at 0, eigenvectors); a 1-D (diagonal) matrix has the identity basis (None)."""
    m = matrix.to(torch.float64)
    if m.dim() == 1:
        return m.clamp(min=0), None
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vals.clamp(min=0), vecs


def rotate(mat: torch.Tensor, qs: torch.Tensor | None, qa: torch.Tensor | None) -> torch.Tensor:
    """``Q_Sᵀ G Q_A`` (an identity basis given as None is skipped): ``[B, r, c]`` -> ``[B, r, c]``."""
    if qs is not None:
        mat = qs.T @ mat
    if qa is not None:
        mat = mat @ qa
    return mat


def _correction_stage(run: _Run, tensors: dict) -> dict:
    bases = {name: (t.get("QS"), t.get("QA")) for name, t in tensors.items() if "LS" in t}

    def terms(k: int, cap: BatchCapture) -> dict[str, torch.Tensor]:
        name = run.blocks[k].name
        if name not in bases:
            return {}
        qs, qa = (None if q is None else q.to(run.dtype) for q in bases[name])
        return {"Lambda": (rotate(_matrices(run, cap, k), qs, qa) ** 2).sum(dim=0)}

    shapes = lambda block: {"Lambda": block.layout.shape} if block.name in bases else {}
    return _sum_over_data(run, "correction", terms, _zeros(run, shapes), pass_index=1)


def _diagonal_stage(run: _Run, tensors: dict) -> dict:
    def terms(k: int, cap: BatchCapture) -> dict[str, torch.Tensor]:
        return {"Lambda": (_matrices(run, cap, k) ** 2).sum(dim=0)}

    return _sum_over_data(run, "diagonal", terms, _zeros(run, lambda block: {"Lambda": block.layout.shape}))


_STAGE_FNS: dict[str, Callable[[_Run, dict], dict]] = {
    "covariance": _covariance_stage,
    "eigen": _eigen_stage,
    "correction": _correction_stage,
    "diagonal": _diagonal_stage,
}


# ---------------------------------------------------------------------------- stage files
def _stage_files(path: "str | os.PathLike[str]") -> dict[str, Path]:
    names = {s for stages in STAGES.values() for s in stages}
    return {s: Path(path) / f"{s}.pt" for s in sorted(names)}


def _merge(tensors: dict[str, dict[str, torch.Tensor]], stage: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, t in stage.items():
        tensors.setdefault(name, {}).update(t)


def _save_stage(file: Path, stage: str, meta: dict[str, Any], tensors: dict) -> None:
    tmp = file.with_suffix(".pt.tmp")
    torch.save({"stage": stage, "metadata": json.dumps(meta, sort_keys=True), "tensors": tensors}, tmp)
    os.replace(tmp, file)


def _read(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise FactorsMismatchError(f"cannot read factor stage file {file}: {exc}; delete it or pass overwrite=True") from exc


def _differences(saved: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(meta))
    return [f"{k}: saved {saved.get(k)!r}, requested {meta.get(k)!r}" for k in keys if saved.get(k) != meta.get(k)]


def _check_existing(files: dict[str, Path], meta: dict[str, Any], overwrite: bool) -> None:
    """Every stage file already in the folder must match ``meta`` (unless ``overwrite``)."""
    if overwrite:
        return
    for stage, file in files.items():
        if file.exists():
            diff = _differences(json.loads(_read(file)["metadata"]), meta)
            if diff:
                raise FactorsMismatchError(
                    f"factors under {file.parent} were fitted with other settings (stage {stage!r}):\n  "
                    + "\n  ".join(diff)
                    + "\nUse another path, or pass overwrite=True to recompute them."
                )


def _load_stage(file: Path, stage: str, meta: dict[str, Any], overwrite: bool) -> dict | None:
    if not file.exists():
        return None
    payload = _read(file)
    if payload.get("stage") != stage or _differences(json.loads(payload["metadata"]), meta):
        if overwrite:
            return None
        _check_existing({stage: file}, meta, overwrite=False)
        raise FactorsMismatchError(f"{file} does not hold stage {stage!r}")
    return payload["tensors"]

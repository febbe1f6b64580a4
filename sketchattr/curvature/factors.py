"""Kronecker-factored (KFAC, EKFAC) and diagonal curvature of Linear/Conv2d modules.

Conventions (N = number of training examples used, t = positions, see :mod:`.capture`):

* ``A = (1/N) Σ_i Σ_t a_t a_tᵀ`` ``[d_in(+1), d_in(+1)]`` and ``S = (1/N) Σ_i Σ_t s_t s_tᵀ``
  ``[d_out, d_out]``: both are sums over positions averaged over *examples* (for T = 1, as
  in an MLP, A ⊗ S is the usual KFAC estimate of E[vec DW vec DWᵀ]).
* ``eigen``: ``A = Q_A diag(λ_A) Q_Aᵀ``, ``S = Q_S diag(λ_S) Q_Sᵀ`` in float64 (eigenvalues
  clamped at 0). KFAC's eigenvalues are ``Λ = λ_S λ_Aᵀ`` ``[d_out, d_in(+1)]``.
* ``correction`` (EKFAC): ``Λ = (1/N) Σ_i (Q_Sᵀ DW_i Q_A)^∘2`` — a second pass over the data.
* ``diagonal``: ``Λ = (1/N) Σ_i DW_i^∘2`` in the parameter basis (one pass, no eigenbases).

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

from sketchattr.curvature.capture import LayerCapture, LayerSpec, layer_specs, per_example_gradients
from sketchattr.curvature.profiler import Profiler
from sketchattr.featurize.featurizer import _as_dataset, _tree_map, dataset_length, main_process
from sketchattr.featurize.fingerprint import model_fingerprint
from sketchattr.modules import select_modules, unwrap_model
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
    docstring); ``metadata["layers"]`` holds each module's :class:`LayerSpec` fields.
    tensors: ``{module: {"A", "S", "QA", "LA", "QS", "LS", "Lambda"}}`` (those the kind has).
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
    def specs(self) -> list[LayerSpec]:
        return [LayerSpec(*layer) for layer in self.metadata["layers"]]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the factor tensors (float64 by default)."""
        return next(t for module in self.tensors.values() for t in module.values()).dtype

    @property
    def n_examples(self) -> int:
        return int(self.metadata["n_examples"])

    def curvature(self, module: str, kind: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(Q_S [d_out, d_out] | None, Q_A [d_in(+1), d_in(+1)] | None, Λ [d_out, d_in(+1)]).

        kind: how to read the factors (default: ``self.kind``); ``"kfac"`` also works on
        EKFAC factors (same eigenbases, Λ = λ_S λ_Aᵀ). The bases are None for ``"diagonal"``.
        """
        kind = kind or self.kind
        t = self.tensors[module]
        if kind == "kfac" and "LS" in t:
            return t["QS"], t["QA"], torch.outer(t["LS"], t["LA"])
        if kind == self.kind == "ekfac":
            return t["QS"], t["QA"], t["Lambda"]
        if kind == self.kind == "diagonal":
            return None, None, t["Lambda"]
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
    specs: list[LayerSpec]
    batch_size: int
    dtype: torch.dtype
    seed: int
    sample: bool
    progress: bool
    profiler: Profiler
    collective: "Collective | None" = None

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
) -> Factors:
    """Fit ``kind`` curvature factors of the selected Linear/Conv2d modules on ``train_dataset``.

    modules: as for :class:`~sketchattr.Featurizer` (default ``task.modules`` or all); use the
    featurizer's selection so the scorer can pair them. fisher: ``"true"`` | ``"empirical"``.
    path: a folder for the stage files (resume; see module docstring). profile: print the
    per-stage timing table at the end (``factors.profiler`` holds it either way).
    collective: fit across processes, each over its shard (see module docstring); a
    DistributedDataParallel-wrapped model is unwrapped.
    """
    if kind not in STAGES:
        raise ValueError(f"kind must be one of {sorted(STAGES)}, got {kind!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    task = validate_task(task)
    model = unwrap_model(model)
    dataset = _as_dataset(train_dataset)
    n = _n_examples(dataset, max_examples)
    specs = _resolve_specs(model, task, modules, dataset)
    meta = _metadata(model, task, specs, kind, fisher, n, len(dataset), max_examples, seed, dtype)
    meta["label_batch_size"] = batch_size if fisher == "true" else None
    profiler = Profiler(enabled=True)
    main = collective is None or collective.is_main
    run = _Run(model, task, dataset, n, specs, batch_size, dtype, seed, fisher == "true", progress and main_process(), profiler, collective)
    files = _stage_files(path) if path is not None else {}
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        _check_existing(files, meta, overwrite)
    tensors: dict[str, dict[str, torch.Tensor]] = {s.name: {} for s in specs}
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


def _resolve_specs(model: nn.Module, task: Task, modules: Any, dataset: Dataset) -> list[LayerSpec]:
    spec = modules if modules is not None else getattr(task, "modules", None)
    example = None
    if isinstance(spec, int) and not isinstance(spec, bool):
        first = next(iter(DataLoader(Subset(dataset, [0]), batch_size=1, generator=torch.Generator())))
        example = task.inputs(_tree_map(_caster(model), first))
    return layer_specs(model, select_modules(model, spec, example).names)


def _metadata(model, task, specs, kind, fisher, n, n_dataset, max_examples, seed, dtype) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        "fisher": fisher,
        "modules": [s.name for s in specs],
        "layers": [[s.name, s.kind, s.d_out, s.d_in, s.bias] for s in specs],
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


def _data_pass(run: _Run, desc: str, consume: Callable[[dict[str, tuple[torch.Tensor, torch.Tensor]]], None], pass_index: int = 0) -> None:
    """One pass over this process's rows of the first ``run.n`` examples: ``consume({module:
    (a, s)})`` per batch, with a and s in ``run.dtype``. Seeds the global RNG per batch with
    ``batch_seed(run.seed, pass_index, global batch index)`` (restored afterwards)."""
    model, prof = run.model, run.profiler
    rows = run.rows
    # own generator: the DataLoader's base-seed draw must not consume the seeded global RNG
    loader = DataLoader(Subset(run.dataset, rows), batch_size=run.batch_size, shuffle=False, generator=torch.Generator())
    first_batch = rows.start // run.batch_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cast = _caster(model)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            with LayerCapture(model, run.specs) as cap:
                for b, batch in enumerate(tqdm(loader, desc=desc, unit="batch", disable=not run.progress)):
                    torch.manual_seed(batch_seed(run.seed, pass_index, first_batch + b))
                    batch = _tree_map(cast, batch)
                    with prof.record("forward + backward"):
                        acts = cap.run(lambda: run.task.train_loss(model, batch, sample=run.sample))
                    with prof.record(f"accumulate ({desc})"):
                        consume({k: (a.to(run.dtype), s.to(run.dtype)) for k, (a, s) in acts.items()})
    finally:
        model.train(was_training)


def _sum_over_data(run: _Run, desc: str, terms: Callable[[str, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], pass_index: int = 0) -> dict:
    """{module: {name: (1/N) Σ_batches terms(module, a, s)[name]}}."""
    sums: dict[str, dict[str, torch.Tensor]] = {s.name: {} for s in run.specs}

    def consume(acts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (a, s) in acts.items():
            for key, value in terms(name, a, s).items():
                acc = sums[name]
                acc[key] = acc[key] + value if key in acc else value

    _data_pass(run, desc, consume, pass_index)
    if run.collective is not None:
        device = next(run.model.parameters()).device
        for spec in run.specs:
            acc = sums[spec.name]
            if not acc:  # no rows on this rank: zeros of the right shapes from an empty batch
                empty = lambda d: torch.zeros(0, 1, d, dtype=run.dtype, device=device)
                acc.update(terms(spec.name, empty(spec.shape[1]), empty(spec.d_out)))
            for key in sorted(acc):
                acc[key] = run.collective.sum(acc[key])
    return {name: {k: v / run.n for k, v in acc.items()} for name, acc in sums.items()}


def _covariance_stage(run: _Run, tensors: dict) -> dict:
    def terms(name: str, a: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
        a2, s2 = a.reshape(-1, a.shape[-1]), s.reshape(-1, s.shape[-1])
        return {"A": a2.T @ a2, "S": s2.T @ s2}

    return _sum_over_data(run, "covariance", terms)


def _eigen_stage(run: _Run, tensors: dict) -> dict:
    out = {}
    with run.profiler.record("eigendecomposition"):
        for name, t in tensors.items():
            la, qa = _eigh(t["A"])
            ls, qs = _eigh(t["S"])
            out[name] = {"QA": qa.to(run.dtype), "LA": la.to(run.dtype), "QS": qs.to(run.dtype), "LS": ls.to(run.dtype)}
    return out


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = matrix.to(torch.float64)
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vals.clamp(min=0), vecs


def _correction_stage(run: _Run, tensors: dict) -> dict:
    bases = {name: (t["QS"].to(run.dtype), t["QA"].to(run.dtype)) for name, t in tensors.items()}

    def terms(name: str, a: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
        qs, qa = bases[name]
        rotated = qs.T @ per_example_gradients(a, s) @ qa
        return {"Lambda": (rotated**2).sum(dim=0)}

    return _sum_over_data(run, "correction", terms, pass_index=1)


def _diagonal_stage(run: _Run, tensors: dict) -> dict:
    def terms(name: str, a: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"Lambda": (per_example_gradients(a, s) ** 2).sum(dim=0)}

    return _sum_over_data(run, "diagonal", terms)


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

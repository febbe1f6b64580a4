"""Featurizer: batched per-example gradients over the selected modules, sketched on the fly.

Default path — the hook engine (:mod:`sketchattr.featurize.engine`): when every selected module
(and every module sharing its parameters) has a layer rule (Linear, transformers' Conv1D,
Conv1d/Conv2d, Embedding, LayerNorm/RMSNorm-style norms), one forward + backward of the batch's
summed loss gives each example's exact gradient; the projector sketches it block by block
(:meth:`~sketchattr.project.Projector.project_captured`; the factorized projectors never form
it). A Task's :meth:`~sketchattr.task.Task.mask` keeps padded positions out. The first batch is
checked against autograd on its first example alone.

Fallback — ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``,
:mod:`sketchattr.featurize.vmap`) for models with a module no rule covers (a warning names them)
or that the check refuses; any module type works there unless its forward has data-dependent
control flow, and then the error says which module and what to do.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from sketchattr.core.batches import (
    as_dataset,
    batch_len,
    dataset_length,
    first_example,
    main_process,
    tree_map,
)
from sketchattr.featurize.capture import HookMismatchError, PreconditionedCapture
from sketchattr.featurize.engine import HookEngine
from sketchattr.featurize.fingerprint import dataset_fingerprint, model_fingerprint
from sketchattr.featurize.memory import check_sketch_memory
from sketchattr.featurize.outcome import (
    FeaturizeRun,
    check_finite,
)
from sketchattr.featurize.passes import example_runner, grad_only, pass_model, task_mask
from sketchattr.featurize.rules import UnsupportedModuleError
from sketchattr.featurize.selection import ModuleSelection, select_modules, unwrap_model
from sketchattr.featurize.sharding import (
    ShardedModelError,
    agreed,
    check_sharded_pass,
    lockstep_batches,
    sharding_of,
)
from sketchattr.featurize.vmap import VmapGradients
from sketchattr.project import FactorizedProjector, Projector, make_projector
from sketchattr.sample import Sampler, dataset_labels, make_sampler
from sketchattr.store import GradientStore, StoreMetadata, make_store
from sketchattr.store.query_rows import QueryRows
from sketchattr.task import Task, validate_task

if TYPE_CHECKING:
    from sketchattr.core.profiler import Profiler
    from sketchattr.featurize.preconditioner import AdamPreconditioner


class Featurizer:
    """Computes sketched per-example gradients of a model.

    model: the trained model (put in eval mode while featurizing, restored after). A
        DistributedDataParallel-wrapped model is unwrapped (``.module``): wrapping before or
        after creating the featurizer gives the same rows, names and fingerprint.
    task: a :class:`~sketchattr.task.Task`.
    modules: ``None``/``"all"``, an int N (last N in forward order) or a list of module names;
        defaults to ``task.modules``.
    projector: a :class:`~sketchattr.project.Projector` or a name (``"sjlt"``, ``"gaussian"``,
        ``"rademacher"``, ``"identity"``, ``"factorized"``, ``"factgrass"``) used with ``m`` and
        ``seed``. A :class:`~sketchattr.project.FactorizedProjector` is bound to the selected
        blocks' layouts.
    batch_size: examples per forward + backward. device: where gradients are computed
        (default: the model's). dtype: gradient dtype (default: the model's parameter dtype;
        another dtype/device runs the model on cast copies of its parameters). progress: tqdm
        bars (never on ranks > 0 of a torch.distributed job).
    engine: ``"auto"`` (hooks when every module has a layer rule, else vmap with a warning),
        ``"hooks"`` (require them) or ``"vmap"``.
    collate_fn: how a list of examples becomes a batch (default: torch's ``default_collate``;
        :class:`~sketchattr.data.collate.PadCollator` pads token sequences of different lengths).
    preconditioner: an :class:`~sketchattr.featurize.preconditioner.AdamPreconditioner` that
        scales each exact per-example gradient by ``1/(sqrt(v) + eps)`` before the projection
        (train rows; query rows too with ``queries=True``); recorded in the store metadata.
    profiler: optional :class:`~sketchattr.core.profiler.Profiler`; records per batch
        ``"featurize <kind>: gradients + sketch"`` and ``"featurize train: store write"`` with
        their row counts.
    memory_budget_gib: the sketch's working memory per batch (rows ``[batch_size, m]`` plus the
        projector's chunk) is estimated before the first batch and refused above this (default:
        half the machine's physical memory), instead of an allocation that fails or swaps.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        modules: Any = None,
        projector: "Projector | str" = "identity",
        m: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        device: "str | torch.device | None" = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        profiler: "Profiler | None" = None,
        engine: str = "auto",
        collate_fn: Callable[[list], Any] | None = None,
        preconditioner: "AdamPreconditioner | None" = None,
        memory_budget_gib: float | None = None,
    ) -> None:
        if engine not in ("auto", "hooks", "vmap"):
            raise ValueError(f"engine must be 'auto', 'hooks' or 'vmap', got {engine!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = unwrap_model(model)
        self.sharding = sharding_of(self.model)
        self.task = validate_task(task)
        self.module_spec = modules if modules is not None else getattr(task, "modules", None)
        self.projector = make_projector(projector, m=m, seed=seed)
        if preconditioner is not None and isinstance(self.projector, FactorizedProjector):
            raise ValueError("an optimizer preconditioner scales each gradient coordinate, which a factorized "
                             "(Kronecker) sketch cannot take: use a dense projector (sjlt, gaussian, rademacher, identity)")
        self.preconditioner = preconditioner
        self.batch_size = int(batch_size)
        first = next(self.model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype if dtype is not None else first.dtype
        self.progress = progress and main_process()
        self.profiler = profiler
        self.last_run: FeaturizeRun | None = None
        self.engine_choice = engine
        self.collate_fn = collate_fn
        self._selection: ModuleSelection | None = None
        self._engine: HookEngine | None = None
        self._vmap_reason: str | None = "engine='vmap' was asked for" if engine == "vmap" else None
        self._verified = False
        self._stop_requested = False
        if memory_budget_gib is not None and not memory_budget_gib > 0:
            raise ValueError(f"memory_budget_gib must be > 0 or None, got {memory_budget_gib!r}")
        self.memory_budget_gib = memory_budget_gib

    # ------------------------------------------------------------------ selection / metadata
    def selection(self, example_input: Any = None) -> ModuleSelection:
        """The selected modules (resolved once; last-N is traced on the first batch)."""
        if self._selection is None:
            sel = select_modules(self.model, self.module_spec, example_input)
            self._engine = HookEngine(self.model, sel)
            self.projector.bind([b.layout for b in self._engine.blocks])
            if self.engine_choice == "hooks":
                self._engine.require("engine='hooks'", "Use engine='auto' to fall back to torch.func.vmap.")
            check_sketch_memory(self.projector, sel.dims, self.batch_size, self.dtype, self.memory_budget_gib)
            self._selection = sel
        return self._selection

    @property
    def engine(self) -> HookEngine:
        """The hook engine of the selected modules (blocks, their layouts and layer rules)."""
        self.selection()
        assert self._engine is not None
        return self._engine

    @property
    def uses_hooks(self) -> bool:
        """Whether per-example gradients come from the hook engine (else ``torch.func.vmap``)."""
        return self._vmap_reason is None and self.engine.covered

    def describe(self) -> str:
        """The blocks, their layer rules, and which path computes their gradients."""
        path = "hook engine" if self.uses_hooks else f"torch.func.vmap ({self._vmap_reason or 'modules without a layer rule'})"
        return self.engine.report() + f"\nper-example gradients: {path}"

    def metadata(self, kind: str = "train") -> StoreMetadata:
        """Metadata identifying sketches made by this featurizer (projector, modules, model, task)."""
        sel = self.selection()
        extra = {} if self.preconditioner is None or not self.preconditioner.applies_to(kind) else {
            "preconditioner": self.preconditioner.spec()}
        return StoreMetadata(
            projector=self.projector.spec(),
            modules=sel.spec(),
            model_fingerprint=model_fingerprint(self.model),
            task=self.task.describe(),
            dim=self.projector.output_dim(sel.dims),
            kind=kind,
            extra=extra,
            dtype=str(self.dtype),
        )

    # ------------------------------------------------------------------ public entry points
    def featurize(
        self,
        dataset: Any,
        store: "GradientStore | str | None" = None,
        indices: Sequence[int] | None = None,
        sampler: "Sampler | str | None" = None,
        overwrite: bool = False,
        max_rows: int | None = None,
        max_seconds: float | None = None,
        **store_kwargs: Any,
    ) -> GradientStore:
        """Sketch the training-loss gradients of ``dataset`` rows into a store and return it.

        store: a :class:`GradientStore`, or ``"none"``/``"cpu"``/``"disk"`` (``store_kwargs``
            such as ``path=`` go to its constructor); default: a new in-memory store.
        indices / sampler: which rows (default all). A sampler's importance weights are stored.
        Rows already written are skipped, so re-running after a crash resumes. The store's
        metadata must match this featurizer's unless ``overwrite``.
        max_rows / max_seconds: stop after at least this many new rows / this much wall time
            (checked after each batch); the rows written so far are kept and a later call
            resumes. ``self.last_run`` (:class:`FeaturizeRun`) says what the call did.
        """
        dataset = self._dataset_of(dataset)
        idx, weights = self.plan_rows(dataset, indices, sampler)
        return self.featurize_rows(dataset, idx, weights, store, overwrite, max_rows, max_seconds, **store_kwargs)

    def featurize_rows(
        self,
        dataset: Any,
        indices: np.ndarray,
        weights: np.ndarray | None = None,
        store: "GradientStore | str | None" = None,
        overwrite: bool = False,
        max_rows: int | None = None,
        max_seconds: float | None = None,
        **store_kwargs: Any,
    ) -> GradientStore:
        """Sketch exactly the rows ``indices`` [n] (importance ``weights`` [n] or None) into a
        store, skipping rows already written; ``featurize`` after :meth:`plan_rows`. Batches
        start at ``indices[0]``, so a shard starting on a batch boundary of the full plan gets
        the batches of a single-process run (bit-identical rows on CPU). ``max_rows`` /
        ``max_seconds``: see :meth:`featurize`."""
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds}")
        t0 = time.perf_counter()
        dataset = self._dataset_of(dataset)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx):
            self.selection(self._example_input(dataset, idx))
        store = make_store(store, **store_kwargs)
        weight_of = dict(zip(idx.tolist(), np.asarray(weights).tolist())) if weights is not None else None
        with store.writing():
            store.prepare(self.metadata("train"), planned=idx, overwrite=overwrite, dataset_fingerprint=dataset_fingerprint(dataset))
            todo = store.missing(idx)
            done = 0
            filler = int(idx[0]) if len(idx) else None
            with contextlib.closing(self.iter_rows(dataset, todo, kind="train", filler=filler)) as batches:
                for batch_idx, rows in batches:
                    w = None if weight_of is None else np.array([weight_of[i] for i in batch_idx.tolist()])
                    with self._record("featurize train: store write", len(batch_idx)):
                        store.write(batch_idx, rows, w)
                    done += len(batch_idx)
                    # a sharded model's ranks stop together: the pass loop agrees on the request
                    self._stop_requested = (max_rows is not None and done >= max_rows) or (
                        max_seconds is not None and time.perf_counter() - t0 >= max_seconds)
        self.last_run = FeaturizeRun(done, len(todo) - done, time.perf_counter() - t0)
        return store

    def plan_rows(
        self, dataset: Any, indices: Sequence[int] | None = None, sampler: "Sampler | str | None" = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The dataset indices [n] to featurize (all, ``indices``, or a sampler's draw) and
        their importance weights [n] (None without a sampler). Resolves the module selection
        on the first planned row (last-N modules are traced there)."""
        dataset = self._dataset_of(dataset)
        if sampler is None:
            idx, weights = self._resolve_indices(dataset, indices), None
        elif indices is not None:
            raise ValueError("give either indices or a sampler, not both")
        else:
            sampler = make_sampler(sampler)
            keys = dataset_labels(dataset) if getattr(sampler, "needs_keys", False) else None
            sample = sampler.sample(len(dataset), keys=keys)
            idx, weights = np.asarray(sample.indices, dtype=np.int64), np.asarray(sample.weights)
        self.selection(self._example_input(dataset, idx))
        return idx, weights

    def query_rows(self, dataset: Any, indices: Sequence[int] | None = None) -> "QueryRows":
        """Sketched measurement gradients of query examples (a Dataset, a DataLoader or a tuple of
        tensors) as :class:`~sketchattr.score.queries.QueryRows`: ``.rows`` [n_query, m] with this
        featurizer's metadata, so a scorer refuses them against a store sketched otherwise."""
        dataset = self._dataset_of(dataset)
        idx = self._resolve_indices(dataset, indices)
        self.selection(self._example_input(dataset, idx))
        blocks = [rows for _, rows in self.iter_rows(dataset, idx, kind="query")]
        return QueryRows(torch.cat(blocks, dim=0), self.metadata("query"), idx)

    def train_rows(self, dataset: Any, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Sketched training-loss gradients as one tensor [n, m] (no store)."""
        dataset = self._dataset_of(dataset)
        idx = self._resolve_indices(dataset, indices)
        self.selection(self._example_input(dataset, idx))
        return torch.cat([rows for _, rows in self.iter_rows(dataset, idx, kind="train")], dim=0)

    # ------------------------------------------------------------------ the loop
    def iter_rows(
        self, dataset: Dataset, indices: np.ndarray, kind: str = "train", sample: bool = False, filler: int | None = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (dataset indices [B], sketched rows [B, m]) batch by batch. A sharded model runs in
        lockstep with the other ranks (:mod:`sketchattr.featurize.sharding`): with fewer batches,
        this rank runs the dataset row ``filler`` (default: its first index) until they are done."""
        if kind not in ("train", "query"):
            raise ValueError(f"kind must be 'train' or 'query', got {kind!r}")
        if len(indices) == 0 and self.sharding is None:
            return
        loader = self._loader(Subset(dataset, indices.tolist()), self.batch_size)
        first = indices[:1].tolist() if len(indices) else ([] if filler is None else [filler])
        fill = next(iter(self._loader(Subset(dataset, first), 1))) if self.sharding is not None and first else None
        yield from self._iter_batches(loader, len(loader), indices, kind, sample, filler=fill)

    def token_rows(self, dataset: Any, index: int) -> tuple[np.ndarray, torch.Tensor]:
        """Per-token sketched training gradients of one sequence: (target positions [n], rows
        [n, m]); row j is the gradient of the loss of the token at ``positions[j]`` alone, so the
        rows sum to the sequence's train row. Needs a Task with ``split_tokens`` (:class:`~sketchattr.task.CausalLMTask`)."""
        split = getattr(self.task, "split_tokens", None)
        if not callable(split):
            raise TypeError(f"per-token rows need a Task with split_tokens(batch) (e.g. CausalLMTask); {type(self.task).__name__} has none")
        dataset = self._dataset_of(dataset)
        idx = self._resolve_indices(dataset, [index])
        self.selection(self._example_input(dataset, idx))
        batch = tree_map(self._to_device, next(iter(self._loader(Subset(dataset, idx.tolist()), 1))))
        copies, positions = split(batch)
        n = len(positions)
        if n == 0:
            return np.zeros(0, dtype=np.int64), torch.zeros(0, self.projector.output_dim(self.selection().dims))
        chunks = [tree_map(lambda t, a=a: t[a : a + self.batch_size], copies) for a in range(0, n, self.batch_size)]
        rows = torch.cat([r for _, r in self._iter_batches(chunks, len(chunks), np.arange(n), "train", False, progress=False,
                                                         filler=chunks[0])])
        return positions.cpu().numpy(), rows

    def _iter_batches(
        self, batches: Any, count: int, indices: np.ndarray, kind: str, sample: bool, progress: bool | None = None,
        filler: Any = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """The loop over ``count`` collated batches: yields (indices [B], rows [B, m]). With a sharded
        model every rank runs as many passes (``filler`` passes, rows dropped) and stops when any
        rank's consumer asked (``_stop_requested``), at the same pass."""
        sel = self.selection()
        was_training = self.model.training
        self.model.eval()
        self._stop_requested = False
        try:
            with contextlib.ExitStack() as stack:
                rows_of = self._batch_rows(kind, sample, sel, stack)
                start = 0
                show = self.progress if progress is None else progress
                bar = stack.enter_context(tqdm(total=len(indices), desc=f"featurize {kind}", unit="ex", disable=not show))
                for batch, real in lockstep_batches(batches, count, self.sharding, filler):
                    batch = tree_map(self._to_device, batch)
                    with self._record(f"featurize {kind}: gradients + sketch", batch_len(batch)):
                        rows = rows_of(batch)
                    if real:
                        b = indices[start : start + batch_len(batch)]
                        check_finite(rows, b, kind)  # every projector maps a NaN/inf coordinate into its row
                        yield b, rows
                        start += len(b)
                        bar.update(len(b))
                    if agreed(self._stop_requested, self.sharding):
                        return
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ per-batch strategies
    def _batch_rows(
        self, kind: str, sample: bool, sel: ModuleSelection, stack: contextlib.ExitStack
    ) -> Callable[[Any], torch.Tensor]:
        """The per-batch computation, chosen once per pass: batch -> sketched rows [B, m]."""
        if self._vmap_reason is None and not self.engine.covered:
            self._vmap_reason = "no layer rule for " + ", ".join(self.engine.uncovered())
            warnings.warn(
                f"sketchattr: {self._vmap_reason}; per-example gradients fall back to torch.func.vmap "
                "(slower, and data-dependent control flow cannot run under it)", stacklevel=4,
            )
        if self._vmap_reason is None:
            return self._hook_rows(kind, sample, sel, stack)
        if self.sharding is not None:
            raise ShardedModelError(
                f"a fully_shard-ed model needs the hook engine ({self._vmap_reason}); torch.func.vmap cannot run "
                "sharded parameters: select modules that have layer rules (Featurizer.describe() lists them)"
            )
        return self._vmap_rows(kind, sample, sel)

    def _vmap_rows(self, kind: str, sample: bool, sel: ModuleSelection) -> Callable[[Any], torch.Tensor]:
        """Per-example gradients by vmap (:mod:`sketchattr.featurize.vmap`), one flat block per module, projected."""
        pre = self.preconditioner
        scale = pre.scale if pre is not None and pre.applies_to(kind) else None
        path = VmapGradients(self.model, self.task, self.device, self.dtype)
        return path.rows(sel, kind, sample, self.projector.project, scale, self.engine.uncovered())

    def _hook_rows(self, kind: str, sample: bool, sel: ModuleSelection, stack: contextlib.ExitStack) -> Callable[[Any], torch.Tensor]:
        """Hook engine: one forward + backward of the summed loss per batch, exact per-example
        gradients (or factors) per block, sketched by the projector. The Task gets the model
        itself (or its cast copy, :func:`~sketchattr.featurize.passes.pass_model`), with only the
        selected parameters requiring grad for the pass."""
        selected = {p for group in sel.param_names for p in group}
        if self.sharding is None:
            model = pass_model(self.model, self.device, self.dtype)
            stack.enter_context(grad_only(model, selected))
        else:  # a sharded model runs as it is (sketchattr.featurize.sharding)
            model = self.model
            check_sharded_pass(model, selected, self.device, self.dtype)
        engine = self.engine if model is self.model else HookEngine(model, sel)
        engine = stack.enter_context(engine.attached())
        task, proj = self.task, self.projector
        scaled = self.preconditioner is not None and self.preconditioner.applies_to(kind)
        fallback: list[Callable[[Any], torch.Tensor]] = []

        def loss_of(batch: Any, sampled: bool) -> Callable[[], torch.Tensor]:
            if kind == "train":
                return lambda: task.train_loss(model, batch, sample=sampled)
            return lambda: task.measurement(model, batch)

        def rows(batch: Any) -> torch.Tensor:
            if fallback:
                return fallback[0](batch)
            n, mask = batch_len(batch), task_mask(self.task, batch, self.device)
            try:
                with torch.enable_grad():
                    cap = engine.run(loss_of(batch, sample), n, mask)
                    if not self._verified:
                        check = cap if not sample else engine.run(loss_of(batch, False), n, mask)
                        engine.verify(check, loss_of(first_example(batch), False))
                        self._verified = True
            except (HookMismatchError, UnsupportedModuleError) as exc:
                if self.engine_choice == "hooks":
                    raise
                self._vmap_reason = f"hook engine refused: {exc}"
                warnings.warn(f"sketchattr: {exc} Falling back to torch.func.vmap for this featurizer.", stacklevel=2)
                fallback.append(self._vmap_rows(kind, sample, sel))
                return fallback[0](batch)
            if scaled:
                cap = PreconditionedCapture(cap, self.preconditioner, sel.param_names)
            return proj.project_captured(cap)

        return rows

    # ------------------------------------------------------------------ helpers
    def _record(self, action: str, items: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.profiler is None else self.profiler.record(action, items=items)

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.collate_fn)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def _example_input(self, dataset: Dataset, idx: np.ndarray) -> Any:
        """``run(model)`` on the first planned row (last-N selection traces the forward order)."""
        if not (isinstance(self.module_spec, int) and not isinstance(self.module_spec, bool)):
            return None
        first = tree_map(self._to_device, next(iter(self._loader(Subset(dataset, idx[:1].tolist()), 1))))
        return example_runner(self.task, first)

    def _dataset_of(self, data: Any) -> Dataset:
        """The dataset behind a Dataset, a tuple of tensors or a DataLoader (rows follow the
        dataset's order, not the loader's sampler; batches use this featurizer's ``batch_size``)."""
        if isinstance(data, DataLoader):
            custom = data.collate_fn is not None and data.collate_fn is not torch.utils.data.default_collate
            if custom and self.collate_fn is None:
                raise ValueError(
                    "the DataLoader batches with its own collate_fn, but this featurizer has none: pass "
                    "collate_fn=<the same function> to the Featurizer (its batches are built from loader.dataset)"
                )
            data = data.dataset
        return as_dataset(data)

    @staticmethod
    def _resolve_indices(dataset: Dataset, indices: Sequence[int] | None) -> np.ndarray:
        n = dataset_length(dataset)
        if indices is None:
            return np.arange(n)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("no indices given: the selection of rows is empty")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"indices must lie in [0, {n}); found range [{idx.min()}, {idx.max()}]")
        return idx

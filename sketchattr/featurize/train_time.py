"""A gradient store built while training: per-example gradients of the training loop's own steps.

:class:`TrainTimeSketcher` reuses a training step's own forward and ``loss.backward()``: the hook
engine (:meth:`~sketchattr.featurize.engine.HookEngine.record`) keeps each selected module's
inputs in forward hooks and its output gradient ``g`` in tensor hooks, the layer rules turn them
into each example's exact gradient (or Kronecker factors) and the projector sketches them. No
second forward or backward of the model is run: only the Task's loss on the step's logits (to
measure the loss scale, below), and on the first captured step one check on one example.

**What a row is.** Row i of a captured step is ``P ∇_θ ℓ(z_i; θ_t)``: the gradient of the
Task's per-example training loss (``task.train_loss`` of example i alone, e.g. its summed
next-token cross-entropy for :class:`~sketchattr.task.CausalLMTask`) at the parameters θ_t the
step's forward ran with, i.e. before its optimizer update, and with the step's own dropout
masks when dropout is active. Without dropout it equals ``Featurizer(...).train_rows`` of
``z_i`` at θ_t (tested in float64).

**The loss reduction.** Training loops backpropagate a mean (over examples, tokens, or tokens of
the whole accumulated batch), not the Task's sum. Assumed: the backpropagated loss is
``L = Σ_i ℓ(z_i) / c_i`` with ``c_i > 0`` (any mean, gradient accumulation, the Hugging Face
Trainer's ``num_items_in_batch``), and it reaches the parameters only through the model's output
(plus terms in the parameters alone, such as weight decay, which never reach a module's
output). ``c_i`` is measured every step, not assumed: the gradient of ``L`` w.r.t. the model's
logits (a tensor hook) is compared with the gradient of the Task's summed loss on the same
logits; example i's output gradients are multiplied by ``c_i``. A loss that is not of this form
(label smoothing the Task does not have, other ignored tokens, an auxiliary loss on the
outputs) fails that comparison with an error instead of giving wrong rows, and the first
captured step is checked against ``torch.autograd.grad`` of the Task's loss of its first
example (skipped while dropout is active, since its masks cannot be replayed).

**Masks.** ``task.mask(batch)`` ``[B, T]`` zeroes padded positions, as in the featurizer.

**Groups.** ``group_by="epoch"`` (default): one store group per epoch, ``"epoch<e>"``, holding one
row per example visited in that epoch (at the parameters of the step that visited it; a second
visit of an index within the epoch is skipped). ``group_by="step"``: one group per captured step,
``"step<t>"``, where t counts the optimizer updates done before the step, so the group's rows are
gradients at the parameters of the Hugging Face checkpoint ``checkpoint-<t>``. Which steps:
``steps=n`` (every n-th, from step 0), a collection of step numbers, or a predicate.

**Metadata.** A group's :class:`~sketchattr.store.StoreMetadata` is what a
:class:`~sketchattr.featurize.Featurizer` with the same projector, modules and task would record,
with ``extra["train_time"] = {"group_by", "dropout"}`` and, for epoch groups, the model
fingerprint ``"train-time:<hash of parameter names, shapes, dtypes>"`` (the values change
during the epoch); a step group keeps the true fingerprint of θ_t. So rows of another run's
settings, of another architecture or of a Featurizer pass are refused (``StoreMismatchError``),
query rows of a Featurizer are refused against an epoch group unless made by
:meth:`TrainTimeSketcher.query_rows`, and a rerun resumes: indices already written in a group
are skipped.

Limits: one process (no torch.distributed), one forward per captured step, no gradient
checkpointing, every selected module needs a layer rule (no vmap fallback at train time).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from sketchattr.core.batches import as_dataset, first_example, process_rank
from sketchattr.featurize.featurizer import Featurizer
from sketchattr.featurize.fingerprint import dataset_fingerprint
from sketchattr.featurize.loss_scale import example_scales, with_logits
from sketchattr.featurize.outcome import NonFiniteGradientError
from sketchattr.featurize.passes import example_runner, task_mask
from sketchattr.project import Projector
from sketchattr.store import GradientStore, StoreMetadata, make_store
from sketchattr.store.shard_files import shard_path
from sketchattr.task import Task, logits_of

__all__ = ["IndexedDataset", "StepSchedule", "TrainTimeSketcher", "architecture_fingerprint"]

INDEX_KEY = "dataset_index"
"""Default batch key of the dataset indices (see :class:`IndexedDataset`)."""

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class IndexedDataset(Dataset):
    """``dataset[i]`` with its index: a dict example gets ``{key: i}`` added, a tuple gets ``i``
    appended, anything else becomes ``(example, i)``. A collator that stacks extra entries
    (:class:`~sketchattr.data.collate.PadCollator`, ``transformers.default_data_collator``) then
    gives each batch its dataset indices ``[B]``."""

    def __init__(self, dataset: Any, key: str = INDEX_KEY) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, dict):
            if self.key in item:
                raise ValueError(f"example {i} already has a {self.key!r} entry: pass another key=")
            return {**item, self.key: i}
        if isinstance(item, tuple):
            return (*item, i)
        return item, i


class StepSchedule:
    """Which optimizer steps to capture: ``steps`` an int n (every n-th step: 0, n, 2n, ...), a
    collection of step numbers, or a predicate ``step -> bool``. Steps count the optimizer
    updates done before the step (0 for the first)."""

    def __init__(self, steps: "int | Iterable[int] | Callable[[int], bool]" = 1) -> None:
        if callable(steps):
            self._wants: Callable[[int], bool] = steps
        elif isinstance(steps, bool) or not isinstance(steps, (int, Iterable)):
            raise TypeError(f"steps must be an int n (every n-th step), a collection of step numbers or a predicate; got {steps!r}")
        elif isinstance(steps, int):
            if steps < 1:
                raise ValueError(f"steps (every n-th step) must be >= 1, got {steps}")
            self._wants = lambda t, n=steps: t % n == 0
        else:
            chosen = frozenset(int(s) for s in steps)
            self._wants = chosen.__contains__

    def __call__(self, step: int) -> bool:
        return bool(self._wants(int(step)))


def architecture_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the parameters' and buffers' names, shapes and dtypes (not values)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def _batch_tensors(batch: Any, n: int) -> Any:
    """A dict batch's tensors with leading dimension ``n`` (drops loss kwargs such as
    ``num_items_in_batch``); other batches as they are."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n}
    return batch


def _checkpointing(model: nn.Module) -> bool:
    """Whether a (Hugging Face) model has activation/gradient checkpointing on."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the first is the newer name
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def _dropout_active(model: nn.Module) -> bool:
    return any(isinstance(m, _DROPOUT) and m.p > 0 and m.training for m in model.modules())


def _as_indices(indices: Any) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"dataset indices must be a 1-D integer array/tensor [B], got {idx.dtype} of shape {idx.shape}")
    return idx.astype(np.int64)


@dataclasses.dataclass
class _Pending:
    """A captured step between its forward and the end of its backward."""

    batch: Any
    indices: np.ndarray
    group: str
    forwards: int = 0
    logits: torch.Tensor | None = None
    """The model's logits, detached (no reference into the step's graph: no cycle keeps it alive)."""
    standin: Any = None
    """The model's output with ``logits`` in place of its logits and every other tensor detached."""
    logits_grad: list[torch.Tensor] = dataclasses.field(default_factory=list)
    """The gradient of the backpropagated loss w.r.t. the logits, once the backward reached them."""


class TrainTimeSketcher:
    """Sketches per-example training gradients from a training loop's own steps into stores.

    model: the model being trained (hooks are attached to it on the first captured step).
    task: the :class:`~sketchattr.task.Task` whose per-example ``train_loss`` defines a row.
    modules, projector, m, seed: as for :class:`~sketchattr.featurize.Featurizer` (same names,
        same sketch: :meth:`featurizer` builds the matching one); default a FactGraSS sketch
        with m = 1024, whose cost at train time is small (an SJLT or Gaussian sketch forms each
        example's exact gradient: about a third of a training step more).
    store: ``"memory"`` (default), ``"cpu"``, ``"disk"`` (one HDF5 file, ``path=``, one group per
        epoch / step) or a callable ``group -> GradientStore``. In a multi-process job (DDP, FSDP2)
        every rank sketches its own examples: into its own memory store, or, on disk, into
        ``<path stem>.rank<r>-of-<W>.h5`` — join them after training with
        ``sketchattr.distributed.join_store(path, W, checkpoint=group)``.
    group_by: ``"epoch"`` or ``"step"`` (see the module docstring). steps: which steps
        (:class:`StepSchedule`). verify: check the first captured step against autograd.
    dataset: the training set, optional: its fingerprint is recorded with each group.

    Custom loop (forward and backward inside :meth:`step`, the optimizer step after it)::

        sketcher = TrainTimeSketcher(model, task, projector="factgrass", m=1024)
        for epoch in range(epochs):
            for batch, idx in loader:
                opt.zero_grad()
                with sketcher.step(batch, idx, epoch=epoch):
                    loss_fn(model(batch)).backward()
                opt.step()
        sketcher.close()
        store = sketcher.stores["epoch0"]
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        modules: Any = None,
        projector: "Projector | str" = "factgrass",
        m: int | None = 1024,
        seed: int = 0,
        store: "str | Callable[[str], GradientStore]" = "memory",
        path: "str | Path | None" = None,
        group_by: str = "epoch",
        steps: "int | Iterable[int] | Callable[[int], bool]" = 1,
        verify: bool = True,
        dataset: Any = None,
    ) -> None:
        if group_by not in ("epoch", "step"):
            raise ValueError(f"group_by must be 'epoch' or 'step', got {group_by!r}")
        if store == "disk" and path is None:
            raise ValueError("store='disk' needs path= (the HDF5 file; one group per epoch or step)")
        if not (callable(store) or store in ("memory", "none", "cpu", "disk")):
            raise ValueError(f"store must be 'memory', 'cpu', 'disk' (with path=) or a callable group -> GradientStore; got {store!r}")
        self.model, self.task = model, task
        self.featurizer_args = dict(modules=modules, projector=projector, m=m, seed=seed)
        self._feat = self._new_featurizer()  # checks the arguments now; rebuilt on the first captured step
        self.store_spec, self.path = store, (Path(path) if path is not None else None)
        self.group_by, self.schedule, self.verify = group_by, StepSchedule(steps), verify
        self.dataset = dataset
        self.stores: dict[str, GradientStore] = {}
        """The stores of the groups written (or opened) so far, by group name."""
        self.skipped = 0
        """Rows not written because their index was already in the group (resumed runs, repeats)."""
        self.global_step = 0
        self._stack: contextlib.ExitStack | None = None
        self._writing: tuple[str, contextlib.ExitStack] | None = None
        self._meta: dict[str, StoreMetadata] = {}
        self._pending: _Pending | None = None
        self._verified = not verify
        self._busy = False
        self._dataset_fp: str | None = None

    # ------------------------------------------------------------------ public
    @property
    def capturing(self) -> bool:
        """A step is being captured (between :meth:`begin` and :meth:`end`)."""
        return self._pending is not None

    @property
    def busy(self) -> bool:
        """The sketcher is running the model itself (selection trace, verification): forwards now are not the loop's."""
        return self._busy

    def wants(self, step: int) -> bool:
        """Whether step ``step`` is captured (the schedule)."""
        return self.schedule(step)

    def group_name(self, epoch: int, step: int) -> str:
        """The store group of a step: ``"epoch<e>"`` or ``"step<t>"``."""
        return f"epoch{int(epoch)}" if self.group_by == "epoch" else f"step{int(step)}"

    @contextlib.contextmanager
    def step(self, batch: Any, indices: Any, *, epoch: int = 0, step: int | None = None) -> Iterator[bool]:
        """Capture one training step: run its forward and ``loss.backward()`` inside, the optimizer
        step after. ``batch``: what the Task reads (targets, attention mask); ``indices``: the
        dataset indices ``[B]`` of its examples. ``step``: the optimizer updates done so far
        (default: an internal counter of :meth:`step` calls). Yields whether the step is captured."""
        t = self.global_step if step is None else int(step)
        self.global_step = t + 1
        captured = self.wants(t) and self.begin(batch, indices, group=self.group_name(epoch, t))
        ok = False
        try:
            yield captured
            ok = True
        finally:
            if captured:
                if ok:
                    self.end()
                else:
                    self.abort()

    def begin(self, batch: Any, indices: Any, group: str) -> bool:
        """Start capturing a step into ``group`` (the model's next forward and the backward after it)."""
        if self._pending is not None:
            raise RuntimeError("a captured step is still open: call end() after its backward before the next begin()")
        idx = _as_indices(indices)
        batch = _batch_tensors(batch, len(idx))
        self._ready(batch)
        mask = task_mask(self.task, batch, self._feat.device)
        self._feat.engine.record(len(idx), mask)
        self._pending = _Pending(batch, idx, group)
        return True

    def end(self) -> torch.Tensor:
        """Finish the captured step after its backward: sketch its rows ``[B, m]`` and write the new
        ones to the group's store (before the optimizer step when ``verify`` still has to check)."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("end() without a captured step (begin() / step() first)")
        engine = self._feat.engine
        try:
            scale = self._scales(pending)
            capture = engine.recorded(scale)
        except BaseException:
            engine.discard()
            raise
        if not self._verified:
            self._check(capture, pending)
        rows = self._feat.projector.project_captured(capture)
        bad = ~torch.isfinite(rows).all(dim=1)
        if bool(bad.any()):
            raise NonFiniteGradientError(f"non-finite (NaN/inf) train-time gradient for dataset row(s) "
                                         f"{pending.indices[bad.cpu().numpy()].tolist()[:10]}: check the loss of these examples")
        self._write(pending.group, pending.indices, rows)
        return rows

    def abort(self) -> None:
        """Drop a captured step (its forward or backward failed)."""
        self._pending = None
        if self._stack is not None:
            self._feat.engine.discard()

    def store(self, group: str) -> GradientStore:
        """The store of ``group`` (opened, not prepared; a disk group written earlier reads back)."""
        if group not in self.stores:
            spec = self.store_spec
            if callable(spec):
                self.stores[group] = spec(group)
            elif spec == "disk":  # each rank of a multi-process job its own file (join with sketchattr.distributed.join_store)
                rank, world = process_rank()
                path = self.path if world == 1 else shard_path(self.path, rank, world)
                self.stores[group] = make_store("disk", path=path, checkpoint=group, rank_shard=world > 1)
            else:
                self.stores[group] = make_store(spec)
        return self.stores[group]

    def metadata(self, group: str) -> StoreMetadata:
        """The metadata of ``group``'s rows (fixed at the group's first captured step)."""
        if group not in self._meta:
            base = self._feat.metadata("train")
            extra = {**base.extra, "train_time": {"group_by": self.group_by, "dropout": _dropout_active(self.model)}}
            fingerprint = base.model_fingerprint if self.group_by == "step" else "train-time:" + architecture_fingerprint(self.model)
            self._meta[group] = dataclasses.replace(base, model_fingerprint=fingerprint, extra=extra)
        return self._meta[group]

    def featurizer(self, model: nn.Module | None = None, **kwargs: Any) -> Featurizer:
        """A :class:`Featurizer` with this sketcher's task, modules and projector (for ``model``,
        default the one being trained); ``kwargs`` go to its constructor (``batch_size=``, ``collate_fn=``)."""
        args = {**self.featurizer_args, "projector": self._feat.projector, **kwargs}
        return Featurizer(model if model is not None else self.model, self.task, **args)

    def query_rows(self, queries: Any, model: nn.Module | None = None, group: str | None = None, **kwargs: Any) -> Any:
        """Query rows at ``model``'s current parameters (default: the trained model), labelled as
        comparable with ``group``'s rows (default: the last group written), so a scorer fitted on a
        train-time group accepts them: the sketch (projector, modules, task) is the same, the
        parameters are by design not those of every row. ``kwargs`` go to :meth:`featurizer`."""
        rows = self.featurizer(model, **kwargs).query_rows(queries)
        group = group if group is not None else (list(self._meta)[-1] if self._meta else None)
        if group is None or getattr(rows, "metadata", None) is None:
            return rows
        meta = dataclasses.replace(rows.metadata, model_fingerprint=self.metadata(group).model_fingerprint)
        return dataclasses.replace(rows, metadata=meta)

    def flush(self) -> None:
        """Commit the rows buffered for the current disk group (call it where your loop saves a checkpoint)."""
        if self._writing is not None:
            _, stack = self._writing
            self._writing = None
            stack.close()

    def close(self) -> None:
        """Flush and detach every hook (the stores stay readable)."""
        if self._pending is not None:
            self.abort()
        self.flush()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> "TrainTimeSketcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _ready(self, batch: Any) -> None:
        """Resolve the module selection (tracing last-N on ``batch``) and attach the hooks, once."""
        if self._stack is not None:
            return
        if _checkpointing(self.model):
            raise ValueError("train-time sketching cannot run with gradient checkpointing (its recomputed forward "
                             "would be captured twice): turn it off, or featurize checkpoints with a Featurizer")
        self._feat = self._new_featurizer()  # the model's device and dtype now (it may have moved since __init__)
        self._busy = True
        try:
            spec = self.featurizer_args["modules"]
            traced = isinstance(spec, int) and not isinstance(spec, bool)
            with torch.no_grad():
                self._feat.selection(example_runner(self.task, batch) if traced else None)
        finally:
            self._busy = False
        engine = self._feat.engine
        engine.require("train-time sketching", "Select modules that have layer rules (modules=...).")
        stack = contextlib.ExitStack()
        stack.enter_context(engine.attached())
        handle = self.model.register_forward_hook(self._root_hook)
        stack.callback(handle.remove)
        self._stack = stack
        if self.dataset is not None:
            self._dataset_fp = dataset_fingerprint(as_dataset(self.dataset))

    def _new_featurizer(self) -> Featurizer:
        return Featurizer(self.model, self.task, engine="hooks", progress=False, **self.featurizer_args)

    def _root_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """End of the model's forward: no more module calls belong to the step; keep the logits' gradient."""
        pending = self._pending
        if pending is None or self._busy:
            return
        pending.forwards += 1
        self._feat.engine.stop_forward()
        if pending.forwards > 1:
            return
        try:
            logits = logits_of(output)
        except TypeError as exc:
            raise TypeError(f"train-time sketching reads the loss's per-example scale from the gradient of the model's "
                            f"logits: {exc}") from None
        pending.logits = logits.detach()
        pending.standin = with_logits(output, pending.logits)
        if logits.requires_grad:  # the hook holds the list only (a closure over `pending` would hold the graph)
            logits.register_hook(pending.logits_grad.append)

    def _scales(self, pending: _Pending) -> torch.Tensor:
        """``c [B]``: the backpropagated loss was ``Σ_i ℓ_i / c_i`` (see :func:`~sketchattr.featurize.loss_scale.example_scales`)."""
        if pending.forwards != 1:
            raise RuntimeError(f"the model ran {pending.forwards} forward passes in one captured step; run exactly one "
                               "forward and one backward inside sketcher.step(...)")
        if not pending.logits_grad:
            raise RuntimeError("no gradient reached the model's output in the captured step: call loss.backward() "
                               "inside sketcher.step(...) (or before end()), on a loss computed from the model's output")
        logits, standin = pending.logits, pending.standin
        if logits.shape[0] != len(pending.indices):
            raise ValueError(f"the model's logits have {logits.shape[0]} rows for {len(pending.indices)} dataset indices")
        leaf = logits.requires_grad_(True)  # the detached logits (sharing their storage) become the leaf
        with torch.enable_grad():
            loss = self.task.train_loss(lambda *a, **k: standin, pending.batch)
            (task_grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        if task_grad is None:
            raise ValueError("the Task's training loss does not depend on the model's logits")
        tol = {torch.float64: 1e-5, torch.float32: 1e-3}.get(logits.dtype, 5e-2)  # HF losses upcast to float32 at most
        return example_scales(task_grad, pending.logits_grad[-1].detach(), tol)

    def _check(self, capture: Any, pending: _Pending) -> None:
        """First captured step: example 0's gradient against autograd of its Task loss alone."""
        if _dropout_active(self.model):
            self._verified = True  # the step's dropout masks cannot be replayed for one example
            return
        self._busy = True
        try:
            with torch.enable_grad():
                self._feat.engine.verify(capture, lambda: self.task.train_loss(self.model, first_example(pending.batch)))
        finally:
            self._busy = False
        self._verified = True

    def _write(self, group: str, indices: np.ndarray, rows: torch.Tensor) -> None:
        """Write the rows whose index the group does not hold yet (first occurrence in the batch)."""
        store = self.store(group)
        if self._writing is None or self._writing[0] != group:
            self.flush()
            with contextlib.ExitStack() as stack:
                stack.enter_context(store.writing())
                store.prepare(self.metadata(group), dataset_fingerprint=self._dataset_fp)  # refuses other settings
                self._writing = (group, stack.pop_all())
        _, first = np.unique(indices, return_index=True)
        first = np.sort(first)
        new = set(store.missing(indices[first]).tolist())
        keep = np.array([i for i in first if int(indices[i]) in new], dtype=np.int64)
        self.skipped += len(indices) - len(keep)
        if len(keep):
            store.write(indices[keep], rows[torch.as_tensor(keep, device=rows.device)])

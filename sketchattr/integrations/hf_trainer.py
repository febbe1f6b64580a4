"""A Hugging Face ``Trainer`` callback that builds a sketchattr store while the model trains.

:class:`SketchCallback` wraps a :class:`~sketchattr.featurize.train_time.TrainTimeSketcher`
(read its module docstring for what a row is, the loss-scale check, groups and metadata): the
Trainer's own forward and backward of every chosen step give the rows, so no extra pass runs.

The dataset indices of a step's examples travel in the batch: give every training example an
index entry (``IndexedDataset(train_set)``, or ``dataset.add_column("dataset_index",
range(len(dataset)))`` for a ``datasets.Dataset``), keep it through the collator
(:class:`~sketchattr.data.collate.PadCollator` and ``default_data_collator`` stack it) and set
``TrainingArguments(remove_unused_columns=False)`` (else the Trainer drops every column the
model's forward does not take). A forward pre-hook removes the entry before the model sees it,
in training and evaluation alike.

Steps and groups: ``steps=n`` (every n-th optimizer step), a list of steps, a predicate, or
``"save"`` (the steps that start from a saved checkpoint: t % save_steps == 0). Each micro-batch
of gradient accumulation is captured after its own backward (``on_substep_end``, and
``on_pre_optimizer_step`` for the last), before the optimizer step. Buffered disk rows are
committed when the Trainer saves a checkpoint, at each epoch's end and at the end of training,
so ``trainer.train(resume_from_checkpoint=...)`` continues the same store.

transformers is imported here only, never by the core package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sketchattr.featurize.train_time import INDEX_KEY, IndexedDataset, StepSchedule, TrainTimeSketcher
from sketchattr.store import GradientStore
from sketchattr.task import Task

__all__ = ["SketchCallback"]


class SketchCallback(TrainerCallback):
    """Sketch per-example gradients of the Trainer's own steps into stores (one group per epoch
    or per captured step).

    task: the Task whose per-example loss the Trainer's loss averages (``CausalLMTask()`` for a
        causal LM trained on ``labels``). modules, projector, m, seed, store, path, group_by,
        verify: as for :class:`~sketchattr.featurize.train_time.TrainTimeSketcher`.
    steps: an int n (every n-th step), step numbers, a predicate, or ``"save"``.
    index_key: the batch entry holding the dataset indices (default ``"dataset_index"``).

    After training, ``callback.stores["epoch0"]`` (or ``"step<t>"``) is a store; the sketcher
    (``callback.sketcher``) makes matching query rows (``callback.sketcher.query_rows(...)``).
    """

    def __init__(
        self,
        task: Task,
        *,
        modules: Any = None,
        projector: Any = "factgrass",
        m: int | None = 1024,
        seed: int = 0,
        store: "str | Callable[[str], GradientStore]" = "memory",
        path: "str | Path | None" = None,
        group_by: str = "epoch",
        steps: "int | str | Iterable[int] | Callable[[int], bool]" = 1,
        verify: bool = True,
        index_key: str = INDEX_KEY,
    ) -> None:
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            raise ImportError("SketchCallback needs a transformers version whose callbacks have on_pre_optimizer_step "
                              "(>= 4.47): the rows must be sketched before the optimizer step")
        if isinstance(steps, str) and steps != "save":
            raise ValueError(f"steps must be an int, step numbers, a predicate or 'save'; got {steps!r}")
        if steps != "save":
            StepSchedule(steps)  # refuse a bad schedule now, not at train time
        self.task, self.index_key, self.steps = task, index_key, steps
        self.options = dict(modules=modules, projector=projector, m=m, seed=seed, store=store, path=path,
                            group_by=group_by, verify=verify)
        self.sketcher: TrainTimeSketcher | None = None
        self._model: Any = None
        self._handle: Any = None
        self._epoch = 0
        self._step = 0
        self._armed = False

    @property
    def stores(self) -> dict[str, GradientStore]:
        """The stores written so far, by group (``"epoch<e>"`` / ``"step<t>"``)."""
        return {} if self.sketcher is None else self.sketcher.stores

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            raise ValueError("SketchCallback needs the model (the Trainer passes it to on_train_begin)")
        if args.remove_unused_columns:
            raise ValueError(
                "SketchCallback reads each batch's dataset indices from its "
                f"{self.index_key!r} entry, which the Trainer drops with remove_unused_columns=True (the model's forward "
                "does not take it): set TrainingArguments(remove_unused_columns=False), give the training set an index "
                "column (sketchattr.integrations.IndexedDataset(train_set), or dataset.add_column("
                f"{self.index_key!r}, range(len(dataset))) for a datasets.Dataset) and use a collator that keeps it "
                "(PadCollator, default_data_collator)"
            )
        if getattr(args, "gradient_checkpointing", False):
            raise ValueError("SketchCallback cannot run with gradient_checkpointing=True (the recomputed forward would be "
                             "captured twice): turn it off, or featurize saved checkpoints with a Featurizer")
        steps = self.steps
        if steps == "save":
            if str(getattr(args.save_strategy, "value", args.save_strategy)) != "steps":
                raise ValueError("steps='save' captures the steps that start from a saved checkpoint: it needs "
                                 "save_strategy='steps'")
            every = int(args.save_steps)
            steps = lambda t: t % every == 0
        if self.sketcher is None or self._model is not model:
            if self.sketcher is not None:
                self.sketcher.close()
            self.sketcher = TrainTimeSketcher(model, self.task, steps=steps, dataset=_base_dataset(kwargs.get("train_dataloader")),
                                              **self.options)
            self._attach(model)
        self._epoch = int(state.epoch or 0)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._epoch = int(state.epoch or 0)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step = int(state.global_step)
        self._armed = self.sketcher is not None and self.sketcher.wants(self._step)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._finish()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._finish()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._finish()
        self._armed = False
        if control.should_save and self.sketcher is not None:
            self.sketcher.flush()  # rows of the steps before a checkpoint are on disk with it

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.sketcher is not None:
            self.sketcher.flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.sketcher is not None:
            self.sketcher.close()

    def remove(self) -> None:
        """Detach everything from the model (the index entry is no longer removed from batches)."""
        if self.sketcher is not None:
            self.sketcher.close()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ internals
    def _attach(self, model: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._model = model
        self._handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def _pre_forward(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Take the index entry out of the model's inputs; on a chosen step, start capturing."""
        indices = kwargs.pop(self.index_key, None)
        sketcher = self.sketcher
        if sketcher is None or not self._armed or not module.training or sketcher.busy:
            return args, kwargs
        if indices is None:
            raise ValueError(
                f"SketchCallback: the training batch has no {self.index_key!r} entry, so its rows cannot be named: give "
                "the training set an index column (IndexedDataset(train_set) or dataset.add_column("
                f"{self.index_key!r}, range(len(dataset)))), keep it through the collator, and set "
                "TrainingArguments(remove_unused_columns=False)"
            )
        if args:
            raise ValueError("SketchCallback expects the model to be called with keyword inputs (as the Trainer does)")
        if sketcher.capturing:  # a micro-batch whose end the callbacks did not see
            sketcher.end()
        sketcher.begin(kwargs, indices, group=sketcher.group_name(self._epoch, self._step))
        return args, kwargs

    def _finish(self) -> None:
        if self.sketcher is not None and self.sketcher.capturing:
            self.sketcher.end()


def _base_dataset(loader: Any) -> Any:
    """The training set behind the Trainer's dataloader (unwrapped from IndexedDataset), or None."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IndexedDataset):
        dataset = dataset.dataset
    try:
        len(dataset)
        dataset[0]
    except Exception:  # noqa: BLE001 - iterable or unusual datasets: no fingerprint is recorded
        return None
    return dataset

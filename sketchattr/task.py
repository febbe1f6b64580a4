"""The Task protocol: what to differentiate for train rows and for query rows.

A Task tells sketchattr how to turn a model and a batch into
  * the training loss (summed over the batch) — the gradient of this is a train row, and
  * the measurement f(z_q) (summed over the batch) — the gradient of this is a query row.

``model`` is the ``nn.Module`` itself on every hook-engine path (featurizer, curvature fits,
train-time sketching), so a Task may read it (``model.parameters()``, dtype checks,
``checkpoint_sequential(model, ...)``); only the ``torch.func.vmap`` fallback, for modules without
a layer rule, passes a functional wrapper that can only be *called*.

Batches may be tensors, ``(inputs, targets)`` tuples, or dicts in the Hugging Face style
(``input_ids``, ``attention_mask``, ``labels``, …): :meth:`Task.forward` calls the model with
the dict's non-label entries as keyword arguments and reads ``.logits`` from a ``ModelOutput``,
so the built-in tasks work on ``transformers`` models as they are.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

Batch = Any
Model = Callable[..., torch.Tensor]

_REQUIRED = ("train_loss", "measurement")
LABEL_KEYS = ("labels", "label")
"""Dict-batch keys holding targets: never passed to the model."""


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor as is, ``.logits`` of a ``ModelOutput``, the
    ``"logits"`` entry of a dict, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}: return a tensor or an object with .logits")


class Task(abc.ABC):
    """Base class of tasks. Subclasses implement :meth:`train_loss` and :meth:`measurement`.

    ``modules`` (optional) names the modules to attribute through; ``None`` means every
    module with parameters (see :func:`sketchattr.featurize.selection.select_modules`).
    """

    modules: Sequence[str] | int | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "Task":
        missing = [m for m in _REQUIRED if getattr(getattr(cls, m, None), "__isabstractmethod__", False)]
        if missing:
            raise TypeError(
                f"{cls.__name__} is missing Task method(s) {missing}: a Task must define "
                "train_loss(model, batch, sample=False) and measurement(model, batch)."
            )
        return super().__new__(cls)

    def inputs(self, batch: Batch) -> Any:
        """The model input of a batch: the first element of an (x, y) pair, a dict's entries
        other than the labels, or the batch itself."""
        if isinstance(batch, dict):
            return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def targets(self, batch: Batch) -> torch.Tensor:
        """The targets of a batch: the second element of an (x, y) pair or a dict's ``labels``."""
        if isinstance(batch, dict):
            for key in LABEL_KEYS:
                if key in batch:
                    return batch[key]
            raise ValueError(f"a dict batch needs a 'labels' entry for its targets; found keys {sorted(batch)}")
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("the default Task expects batches of (inputs, targets) pairs or dicts with 'labels'")
        return batch[1]

    def forward(self, model: Model, batch: Batch) -> torch.Tensor:
        """The model's logits on a batch: ``model(**inputs)`` for dict inputs, ``model(inputs)``
        otherwise, then :func:`logits_of` (tensor, ``ModelOutput.logits``, …)."""
        x = self.inputs(batch)
        return logits_of(model(**x) if isinstance(x, dict) else model(x))

    @abc.abstractmethod
    def train_loss(self, model: Model, batch: Batch, sample: bool = False) -> torch.Tensor:
        """Training loss summed over the batch (scalar). With ``sample=True`` the targets are
        drawn from the model's predictive distribution (true Fisher) instead of the data."""

    @abc.abstractmethod
    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        """Measurement f(z) summed over the batch (scalar); its gradient is the query row."""

    def mask(self, batch: Batch) -> torch.Tensor | None:
        """Which positions of a sequence batch count: ``[B, T]``, 1 for a real token and 0 for
        padding, or None when every position counts. Default: a dict batch's ``attention_mask``
        (Hugging Face), else None. ``[B, C, T]`` says each example is C sequences that the model
        runs as C rows of its batch (multiple choice: ``[B, C, T]`` ids reshaped to ``[B·C, T]``);
        a layer's rows ``b·C … b·C + C − 1`` are then example b's.

        The hook engine zeroes masked positions in every layer whose output is ``[B, T, …]``, so
        padding never reaches a gradient row or a curvature statistic (the activation covariance
        of EKFAC/KFAC in particular); the loss itself must already ignore padded positions, and
        a true-Fisher ``train_loss(sample=True)`` should draw labels for the real positions only
        (``sample_categorical(logits[mask == 1])``) so the draws do not depend on the padding."""
        if isinstance(batch, dict):
            mask = batch.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
                return mask
        return None

    def describe(self) -> str:
        """The task's identity stored in store metadata: its class and configuration, so that rows of a
        task built with other arguments (another loss scale, label smoothing, ...) are not mixed into
        a store. Default: the class name and every public attribute whose value is a number, str,
        bool, None or a tuple/list of those (callables by qualified name); override for anything else."""
        return describe_config(self)


def describe_config(obj: Any) -> str:
    """``ClassName(a=1, b='x')`` from ``obj``'s public attributes with simple values (sorted by name)."""
    parts = []
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_"):
            continue
        if callable(value) and not isinstance(value, type):
            value = getattr(value, "__qualname__", type(value).__name__)
        if isinstance(value, (bool, int, float, str, type(None))) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value)
        ):
            parts.append(f"{key}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def validate_task(task: Any) -> Any:
    """Check at the boundary that ``task`` provides the Task methods; return it."""
    missing = [m for m in _REQUIRED if not callable(getattr(task, m, None))]
    if missing:
        raise TypeError(
            f"{type(task).__name__} is not a Task: missing method(s) {missing}. A Task must define "
            "train_loss(model, batch, sample=False) and measurement(model, batch)."
        )
    return task


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """Draw one class per row from softmax(logits) with the Gumbel-max trick.

    Works under ``torch.func.vmap(randomness="different")`` and uses the global RNG, so it is
    reproducible under ``torch.manual_seed``. logits: [B, C] -> [B] int64.
    """
    u = torch.rand_like(logits.detach()).clamp(min=1e-20, max=1.0 - 1e-7)
    return torch.argmax(logits.detach() - torch.log(-torch.log(u)), dim=-1)


def margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Classification margin logit_y − logsumexp(other logits). [B, C], [B] -> [B]."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, C] and targets [B]; found {tuple(logits.shape)} and {tuple(targets.shape)}")
    y = targets.long().unsqueeze(1)
    others = logits.scatter(1, y, float("-inf"))
    return logits.gather(1, y).squeeze(1) - torch.logsumexp(others, dim=1)


def _class_targets(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Integer class targets checked against the logits' classes (a clear error, not a CUDA assert or
    a silent zero row): integer dtype, shape [B] (or [B, 1]), every label in 0..C-1."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        found = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"classification labels must be integer class ids (an int64 tensor [B]); found {found}")
    if targets.dim() == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    t = targets.long()
    if logits.dim() != 2 or t.dim() != 1 or t.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits [B, C] and labels [B]; found {tuple(logits.shape)} and {tuple(targets.shape)}")
    try:
        lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    except RuntimeError:  # inside a torch.func transform values are not concrete: cross_entropy checks them
        return t
    if lo == -100:
        raise ValueError("a label is -100 (cross-entropy's ignore_index): that example would get an all-zero gradient "
                         f"row; classification needs every label in 0..{logits.shape[1] - 1} (drop such rows first)")
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(f"labels out of range: found [{lo}, {hi}] for {logits.shape[1]} classes")
    return t


class ClassificationTask(Task):
    """Cross-entropy training loss; margin measurement (positive score = helps the query).

    Works on ``(x, y)`` batches and on Hugging Face sequence classifiers with dict batches
    (``input_ids``, ``attention_mask``, ``labels``; logits read from ``.logits``); the
    attention mask keeps padded tokens out of every row and statistic.
    """

    def train_loss(self, model: Model, batch: Batch, sample: bool = False) -> torch.Tensor:
        logits = self.forward(model, batch)
        targets = sample_categorical(logits) if sample else _class_targets(self.targets(batch), logits)
        return F.cross_entropy(logits, targets, reduction="sum")

    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        logits = self.forward(model, batch)
        return margin(logits, _class_targets(self.targets(batch), logits)).sum()


class RegressionTask(Task):
    """Squared-error training loss ½‖f(x) − y‖² (Gaussian noise of ``noise_std`` when sampling).

    ``measure="neg_loss"`` (default): f = −½‖f(x) − y‖², so a positive score helps the query,
    as for classification. ``measure="output"``: f = the prediction summed over outputs.
    """

    def __init__(self, measure: str = "neg_loss", noise_std: float = 1.0) -> None:
        if measure not in ("neg_loss", "output"):
            raise ValueError(f"measure must be 'neg_loss' or 'output', got {measure!r}")
        self.measure = measure
        self.noise_std = float(noise_std)

    def train_loss(self, model: Model, batch: Batch, sample: bool = False) -> torch.Tensor:
        pred = self.forward(model, batch)
        if sample:
            target = pred.detach() + self.noise_std * torch.randn_like(pred.detach())
        else:
            target = self.targets(batch).reshape(pred.shape).to(pred.dtype)
        return 0.5 * ((pred - target) ** 2).sum()

    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        pred = self.forward(model, batch)
        if self.measure == "output":
            return pred.sum()
        target = self.targets(batch).reshape(pred.shape).to(pred.dtype)
        return -0.5 * ((pred - target) ** 2).sum()

    def describe(self) -> str:
        return f"RegressionTask(measure={self.measure})"


SequenceClassificationTask = ClassificationTask
"""Hugging Face sequence classification (``AutoModelForSequenceClassification``): the same task."""


class CausalLMTask(Task):
    """Next-token language modelling.

    Batches: token tensors ``[B, T]``; ``(tokens,)`` or ``(tokens, labels)`` tuples; or dicts
    ``{"input_ids", "attention_mask"?, "labels"?, …}`` (Hugging Face; the model is called with
    every entry but the labels). The model returns logits ``[B, T, V]`` or a ``ModelOutput``
    with ``.logits``. Position t predicts token t + 1; a target counts when its label is not
    −100 and its attention mask is 1 (labels default to the tokens).

    * ``train_loss``: next-token cross-entropy summed over the counted targets. With
      ``sample=True`` the targets are drawn from the model's predictive distribution at the
      counted positions only (the true Fisher; padding does not change the draws).
    * ``measurement``: the log-likelihood of the counted targets (a positive score means the
      training example helps the query), or of each sequence's last ``last_tokens`` of them.
      Set labels of a prompt to −100 to measure the response only.
    * ``mask``: the attention mask of a dict batch (padding stays out of every statistic).
    * :meth:`token_losses` and :meth:`split_tokens` serve per-token attribution.
    """

    def __init__(self, last_tokens: int | None = None) -> None:
        if last_tokens is not None and (isinstance(last_tokens, bool) or not isinstance(last_tokens, int) or last_tokens < 1):
            raise ValueError(f"last_tokens must be None or an int >= 1, got {last_tokens!r}")
        self.last_tokens = last_tokens

    def inputs(self, batch: Batch) -> Any:
        if isinstance(batch, dict):
            return super().inputs(batch)
        tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
        return tokens

    def _tokens(self, batch: Batch) -> torch.Tensor:
        x = self.inputs(batch)
        tokens = x.get("input_ids") if isinstance(x, dict) else x
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
            found = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"CausalLMTask expects tokens [B, T] with T >= 2 (a tensor, (tokens, labels) or a dict with input_ids); found {found}")
        return tokens

    def _labels(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Labels [B, T] with −100 where nothing is predicted (the tokens by default)."""
        labels = None
        if isinstance(batch, dict):
            labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        elif isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor) and batch[1].shape == tokens.shape:
            labels = batch[1]
        labels = tokens if labels is None else labels
        if labels.shape != tokens.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the tokens' shape {tuple(tokens.shape)}")
        mask = self.mask(batch)
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
        return labels.long()

    def predictions(self, model: Model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T−1, V], targets [B, T−1] with −100 where not counted)."""
        tokens = self._tokens(batch)
        logits = self.forward(model, batch)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
            raise ValueError(f"expected logits [B, T, V] for tokens {tuple(tokens.shape)}; found {tuple(logits.shape)}")
        return logits[:, :-1], self._labels(batch, tokens)[:, 1:]

    def token_losses(self, model: Model, batch: Batch) -> torch.Tensor:
        """Next-token losses ``[B, T−1]`` (0 where not counted); entry t is the loss of token t + 1."""
        logits, targets = self.predictions(model, batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none")
        return loss.reshape(targets.shape)

    def train_loss(self, model: Model, batch: Batch, sample: bool = False) -> torch.Tensor:
        logits, targets = self.predictions(model, batch)
        if sample:
            counted = targets != -100
            targets = targets.clone()
            targets[counted] = sample_categorical(logits[counted])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")

    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        logits, targets = self.predictions(model, batch)
        if self.last_tokens is not None:
            counted = targets != -100
            rank_from_end = counted.flip(1).long().cumsum(1).flip(1)  # 1 for the last counted target
            targets = targets.masked_fill(~counted | (rank_from_end > self.last_tokens), -100)
        return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")

    def mask(self, batch: Batch) -> torch.Tensor | None:
        return super().mask(batch) if isinstance(batch, dict) else None

    def split_tokens(self, batch: Batch) -> tuple[Batch, torch.Tensor]:
        """A batch of ONE sequence -> (a batch of copies, one per counted target, whose only
        counted target is that one; the target positions ``[n]`` in the sequence, 1..T−1).
        The copies' losses are the sequence's per-token losses and sum to its loss."""
        tokens = self._tokens(batch)
        if tokens.shape[0] != 1:
            raise ValueError(f"split_tokens takes a batch of one sequence; got {tokens.shape[0]}")
        labels = self._labels(batch, tokens)
        positions = (labels[0, 1:] != -100).nonzero().reshape(-1) + 1
        n = len(positions)
        only = torch.full((n, tokens.shape[1]), -100, dtype=torch.long, device=tokens.device)
        only[torch.arange(n, device=tokens.device), positions] = labels[0, positions]
        if isinstance(batch, dict):
            copies = {k: (v.expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.shape[:1] == (1,) else v) for k, v in batch.items()}
            copies = {k: v for k, v in copies.items() if k not in LABEL_KEYS}
            copies["labels"] = only
            return copies, positions
        return (tokens.expand(n, -1), only), positions

    def describe(self) -> str:
        return "CausalLMTask" if self.last_tokens is None else f"CausalLMTask(last_tokens={self.last_tokens})"


class LossTask(Task):
    """A task from a loss function: ``loss_fn(output, batch)`` -> the loss summed over the batch,
    where ``output`` is the model's raw output on the batch's inputs (a tensor or a ``ModelOutput``).

    measurement_fn: ``f(output, batch)`` summed over the batch (default: ``−loss_fn``, so a
    positive score helps the query). sample_fn: ``(output, batch) -> batch`` with targets drawn
    from the model, for the true Fisher; without it ``train_loss(sample=True)`` raises (fit
    curvature with ``fisher="empirical"``). name: what store metadata records.
    """

    def __init__(self, loss_fn: Callable[[Any, Batch], torch.Tensor], measurement_fn: Callable[[Any, Batch], torch.Tensor] | None = None,
                 sample_fn: Callable[[Any, Batch], Batch] | None = None, name: str | None = None) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, batch) -> summed loss, got {type(loss_fn).__name__}")
        self.loss_fn, self.measurement_fn, self.sample_fn = loss_fn, measurement_fn, sample_fn
        self.name = name or getattr(loss_fn, "__name__", "loss")

    def output(self, model: Model, batch: Batch) -> Any:
        """The model's raw output on the batch's inputs."""
        x = self.inputs(batch)
        return model(**x) if isinstance(x, dict) else model(x)

    def train_loss(self, model: Model, batch: Batch, sample: bool = False) -> torch.Tensor:
        out = self.output(model, batch)
        if sample:
            if self.sample_fn is None:
                raise ValueError("LossTask cannot sample targets from the model without sample_fn: pass one, or fit "
                                 "curvature with fisher='empirical'")
            batch = self.sample_fn(out, batch)
        return self.loss_fn(out, batch)

    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        out = self.output(model, batch)
        return self.measurement_fn(out, batch) if self.measurement_fn is not None else -self.loss_fn(out, batch)

    def describe(self) -> str:
        return f"LossTask({self.name})"

"""The Task protocol: what to differentiate for train rows and for query rows.

A Task tells sketchattr how to turn a model and a batch into
  * the training loss (summed over the batch) — the gradient of this is a train row, and
  * the measurement f(z_q) (summed over the batch) — the gradient of this is a query row.

``model`` may be an ``nn.Module`` or any callable with the same signature (the featurizer
passes a functional wrapper), so a Task must only *call* it, never inspect its parameters.
Per-example gradients are taken by calling the Task on batches of one example.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

Batch = Any
Model = Callable[..., torch.Tensor]

_REQUIRED = ("train_loss", "measurement")


class Task(abc.ABC):
    """Base class of tasks. Subclasses implement :meth:`train_loss` and :meth:`measurement`.

    ``modules`` (optional) names the modules to attribute through; ``None`` means every
    module with parameters (see :func:`sketchattr.modules.select_modules`).
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
        """The model input of a batch; default: the first element of a (x, y) pair."""
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def targets(self, batch: Batch) -> torch.Tensor:
        """The targets of a batch; default: the second element of a (x, y) pair."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("the default Task expects batches of (inputs, targets) pairs")
        return batch[1]

    @abc.abstractmethod
    def train_loss(self, model: Model, batch: Batch, sample: bool = False) -> torch.Tensor:
        """Training loss summed over the batch (scalar). With ``sample=True`` the targets are
        drawn from the model's predictive distribution (true Fisher) instead of the data."""

    @abc.abstractmethod
    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        """Measurement f(z) summed over the batch (scalar); its gradient is the query row."""

    def mask(self, batch: Batch) -> torch.Tensor | None:
        """Which positions of a sequence batch count: ``[B, T]``, 1 for a real token and 0 for
        padding (like a Hugging Face ``attention_mask``), or None when every position counts.

        The hook engine zeroes masked positions in every layer whose output is ``[B, T, …]``, so
        padding never reaches a gradient row or a curvature statistic (the activation covariance
        of EKFAC/KFAC in particular); the loss itself must already ignore padded positions, and
        a true-Fisher ``train_loss(sample=True)`` should draw labels for the real positions only
        (``sample_categorical(logits[mask == 1])``) so the draws do not depend on the padding."""
        return None

    def describe(self) -> str:
        """A short identity string stored in store metadata."""
        return type(self).__name__


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


class ClassificationTask(Task):
    """Cross-entropy training loss; margin measurement (positive score = helps the query)."""

    def train_loss(self, model: Model, batch: Batch, sample: bool = False) -> torch.Tensor:
        logits = model(self.inputs(batch))
        targets = sample_categorical(logits) if sample else self.targets(batch)
        return F.cross_entropy(logits, targets, reduction="sum")

    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        return margin(model(self.inputs(batch)), self.targets(batch)).sum()


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
        pred = model(self.inputs(batch))
        if sample:
            target = pred.detach() + self.noise_std * torch.randn_like(pred.detach())
        else:
            target = self.targets(batch).reshape(pred.shape).to(pred.dtype)
        return 0.5 * ((pred - target) ** 2).sum()

    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        pred = model(self.inputs(batch))
        if self.measure == "output":
            return pred.sum()
        target = self.targets(batch).reshape(pred.shape).to(pred.dtype)
        return -0.5 * ((pred - target) ** 2).sum()

    def describe(self) -> str:
        return f"RegressionTask(measure={self.measure})"


class CausalLMTask(Task):
    """Next-token language modelling on token sequences (e.g. the maestro split).

    A batch is a tensor of tokens [B, T] or a tuple/list whose first element is one (``(tokens,)``,
    as yielded by a one-tensor TensorDataset); further elements are ignored. The model maps tokens
    [B, T] -> logits [B, T, V]; position t predicts token t + 1.

    * ``train_loss``: next-token cross-entropy summed over the T − 1 positions and the batch. With
      ``sample=True`` the next tokens are drawn from the model's predictive distribution
      (:func:`sample_categorical` on logits [B·(T−1), V]) — the true Fisher.
    * ``measurement``: the negative summed next-token loss (the query's log-likelihood), so a
      positive score means the training example helps the query, as with the classification margin.
    """

    @staticmethod
    def _next_token_logits(model: Model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"CausalLMTask expects tokens [B, T] with T >= 2; found {tuple(tokens.shape)}")
        logits = model(tokens)
        if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
            raise ValueError(f"expected logits [B, T, V] for tokens {tuple(tokens.shape)}; found {tuple(logits.shape)}")
        pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # [B·(T−1), V]
        return pred, tokens[:, 1:].reshape(-1).long()

    def train_loss(self, model: Model, batch: Batch, sample: bool = False) -> torch.Tensor:
        pred, targets = self._next_token_logits(model, self.inputs(batch))
        if sample:
            targets = sample_categorical(pred)
        return F.cross_entropy(pred, targets, reduction="sum")

    def measurement(self, model: Model, batch: Batch) -> torch.Tensor:
        pred, targets = self._next_token_logits(model, self.inputs(batch))
        return -F.cross_entropy(pred, targets, reduction="sum")

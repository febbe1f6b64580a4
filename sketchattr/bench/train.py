"""Generic training for the experiment models: ``train_model(model, split, ...)``.

Classification uses :func:`sketchattr.bench.recipes.train_classifier` (SGD momentum 0.9, weight decay 1e-3,
mean cross-entropy, batch 64, reshuffled by a ``torch.Generator`` seeded with ``seed``, torch pinned to
1 intra-op thread). Language models use AdamW (weight decay 0.01) on the mean next-token
cross-entropy with the same shuffling and threading. Defaults by (dataset, model), with the wall time on
1000 train rows, 2 CPU cores (``DEFAULT_RECIPES``; a dataset not listed uses the model's ``*`` row):

| dataset | model | epochs | lr | time on 1000 rows (2 cores, 1 thread) |
| --- | --- | --- | --- | --- |
| digits | mlp | 60 | 0.05 | ~0.5 s (the bench recipe exactly: equals ``train_digits_mlp``) |
| digits | lr | 60 | 0.05 | ~0.3 s |
| mnist | lr / mlp | 10 | 0.05 | ~0.1 s / ~0.15 s |
| cifar2 | lr / mlp | 10 | 0.01 | ~0.1 s / ~0.35 s |
| any | resnet9 (width 16, 0.41M params) | 10 | 0.05 | ~25 s (~12 s with ``num_threads=None``) |
| any | musictransformer (0.12M params, V=128, T=64) | 10 | 3e-3 (AdamW) | ~12 s |
| any | gpt (preset ``gpt-14m``: 13.8M params) | 10 | 3e-3 (AdamW) | not timed |
| other | lr / mlp | 20 | 0.05 | |

Epoch counts are for ~1000-row experiment subsets; pass ``epochs=`` for full-size datasets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sketchattr.bench.models.registry import model_name_of
from sketchattr.bench.recipes import epoch_batches, torch_threads, train_classifier

if TYPE_CHECKING:
    from sketchattr.bench.data.registry import DatasetSplit


@dataclass(frozen=True)
class Recipe:
    """Default epochs and learning rate of one (dataset, model) pair."""

    epochs: int
    lr: float


DEFAULT_RECIPES: dict[tuple[str, str], Recipe] = {
    ("digits", "mlp"): Recipe(60, 0.05),
    ("digits", "lr"): Recipe(60, 0.05),
    ("mnist", "lr"): Recipe(10, 0.05),
    ("mnist", "mlp"): Recipe(10, 0.05),
    ("cifar2", "lr"): Recipe(10, 0.01),
    ("cifar2", "mlp"): Recipe(10, 0.01),
    ("*", "lr"): Recipe(20, 0.05),
    ("*", "mlp"): Recipe(20, 0.05),
    ("*", "resnet9"): Recipe(10, 0.05),
    ("*", "musictransformer"): Recipe(10, 3e-3),
    ("*", "gpt"): Recipe(10, 3e-3),
}
FALLBACK = Recipe(20, 0.05)


def default_recipe(dataset: str, model: str | None) -> Recipe:
    """The default recipe for ``(dataset, model)``: exact entry, else ``("*", model)``, else FALLBACK."""
    if model is None:
        return FALLBACK
    return DEFAULT_RECIPES.get((dataset, model), DEFAULT_RECIPES.get(("*", model), FALLBACK))


def _subset_index(subset: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
    if subset is None:
        return None
    sub = torch.as_tensor(np.asarray(subset))
    if sub.dtype == torch.bool:
        if sub.shape != (n,):
            raise ValueError(f"a boolean subset must have shape [{n}], got {tuple(sub.shape)}")
        sub = sub.nonzero().squeeze(1)
    sub = sub.long().reshape(-1)
    if sub.numel() == 0:
        raise ValueError("subset is empty")
    if int(sub.min()) < 0 or int(sub.max()) >= n:
        raise ValueError(f"subset positions must lie in [0, {n})")
    return sub


def train_lm(model: nn.Module, tokens: torch.Tensor, *, epochs: int, lr: float, weight_decay: float = 0.01,
             batch_size: int = 64, seed: int = 0, num_threads: int | None = 1) -> nn.Module:
    """AdamW on the mean next-token cross-entropy of tokens [N, T]; returns ``model`` in eval mode."""
    n = len(tokens)
    if n == 0 or tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"expected non-empty tokens [N, T] with T >= 2; found {tuple(tokens.shape)}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    with torch_threads(num_threads):
        for batches in epoch_batches(n, batch_size, epochs, seed):
            for idx in batches:
                batch = tokens[idx]
                logits = model(batch)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


def train_model(
    model: nn.Module,
    split: "DatasetSplit",
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    subset: np.ndarray | torch.Tensor | None = None,
    model_name: str | None = None,
    num_threads: int | None = 1,
) -> nn.Module:
    """Train ``model`` in place on ``split.train`` (rows ``subset`` only, when given); return it in eval mode.

    epochs / lr: default from :func:`default_recipe` (``split.name``, ``model_name`` or the name
    :func:`~sketchattr.bench.models.model_name_of` finds). subset: positions into ``split.train`` (int array
    or bool mask [N]) — e.g. the half-subsets of an LDS ground truth. ``seed`` drives shuffling only;
    the initialisation comes from ``make_model(..., seed=...)``. Deterministic for fixed seeds and
    ``num_threads`` (torch intra-op threads during training; None = leave the global setting).
    """
    recipe = default_recipe(split.name, model_name or model_name_of(model))
    epochs = recipe.epochs if epochs is None else int(epochs)
    lr = recipe.lr if lr is None else float(lr)
    tensors = split.train.tensors
    sub = _subset_index(subset, len(tensors[0]))
    if sub is not None:
        tensors = tuple(t[sub] for t in tensors)
    if split.num_classes is None:
        return train_lm(model, tensors[0], epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, num_threads=num_threads)
    x, y = tensors[0], tensors[1]
    return train_classifier(model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, num_threads=num_threads)


@torch.no_grad()
def evaluate_model(model: nn.Module, split: "DatasetSplit", which: str = "test", batch_size: int = 256) -> dict[str, float]:
    """Mean loss (and accuracy for classifiers) of ``model`` on ``split.test`` or ``split.train``.

    LM: ``loss`` is the mean next-token cross-entropy per predicted token.
    """
    if which not in ("test", "train"):
        raise ValueError(f"which must be 'test' or 'train', got {which!r}")
    tensors = getattr(split, which).tensors
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    try:
        for start in range(0, len(tensors[0]), batch_size):
            x = tensors[0][start : start + batch_size]
            out = model(x)
            if split.num_classes is None:
                total += F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
                count += x[:, 1:].numel()
            else:
                y = tensors[1][start : start + batch_size]
                total += F.cross_entropy(out, y, reduction="sum").item()
                correct += int((out.argmax(1) == y).sum())
                count += len(y)
    finally:
        model.train(was_training)
    result = {"loss": total / max(count, 1)}
    if split.num_classes is not None:
        result["accuracy"] = correct / max(count, 1)
    return result

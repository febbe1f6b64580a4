"""Use a Kronfluence ``Task`` as a sketchattr :class:`~sketchattr.task.Task`, sign convention included.

Kronfluence's Task methods take ``(batch, model)``; its ``compute_measurement`` is a loss-like
quantity and its scores are ``∇f_Kᵀ H⁻¹ ∇ℓ_i`` — positive when up-weighting example i *lowers*
f_K, i.e. helps. sketchattr scores ``−∇fᵀ M ∇ℓ_i``, the predicted change of a higher-is-better
measurement f. Renaming the methods alone would keep f = f_K and swap proponents and opponents
without a word; :class:`KronfluenceTask` measures ``f = −f_K``, so its scores *equal*
Kronfluence's (same sign, same magnitude, up to the curvature approximation and damping).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sketchattr.task import Task

KRONFLUENCE_METHODS = ("compute_train_loss", "compute_measurement")


class KronfluenceTask(Task):
    """A sketchattr Task around a Kronfluence-style task object.

    kronfluence_task: an object with ``compute_train_loss(batch, model, sample=False)`` and
    ``compute_measurement(batch, model)`` (both summed over the batch), and optionally
    ``get_influence_tracked_modules()`` (module names, or None for all) and
    ``get_attention_mask(batch)`` (``[B, T]``, 1 = real token, or None). It need not subclass
    ``kronfluence.task.Task``: kronfluence itself is not imported.

    ``measurement = −compute_measurement`` (see the module docstring): scores equal Kronfluence's.
    ``modules`` comes from ``get_influence_tracked_modules`` (Kronfluence tracks every Linear and
    Conv2d when it returns None; sketchattr's default is every module with parameters — pass
    ``modules="linear"`` or names to the Featurizer to match). Per-module attention masks (a dict
    from ``get_attention_mask``) and ``post_process_per_sample_gradient`` are refused, not ignored.
    """

    def __init__(self, kronfluence_task: Any) -> None:
        missing = [m for m in KRONFLUENCE_METHODS if not callable(getattr(kronfluence_task, m, None))]
        if missing:
            raise TypeError(
                f"KronfluenceTask wraps an object with Kronfluence's Task methods {list(KRONFLUENCE_METHODS)}; "
                f"{type(kronfluence_task).__name__} lacks {missing}"
            )
        if getattr(kronfluence_task, "enable_post_process_per_sample_gradient", False):
            raise NotImplementedError(
                f"{type(kronfluence_task).__name__} post-processes per-sample gradients "
                "(enable_post_process_per_sample_gradient=True), which sketchattr does not replay: select the modules "
                "to attribute instead, or disable it"
            )
        self.kronfluence_task = kronfluence_task
        self.name = type(kronfluence_task).__name__
        tracked = getattr(kronfluence_task, "get_influence_tracked_modules", None)
        names = tracked() if callable(tracked) else None
        self.modules: Sequence[str] | None = None if names is None else list(names)

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Runs the wrapped task's training loss (Kronfluence tasks expose no logits); used to trace
        the modules' forward order."""
        return self.kronfluence_task.compute_train_loss(batch, model, False)

    def train_loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        return self.kronfluence_task.compute_train_loss(batch, model, sample)

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``−compute_measurement(batch, model)``: Kronfluence's measurement is loss-like."""
        return -self.kronfluence_task.compute_measurement(batch, model)

    def mask(self, batch: Any) -> torch.Tensor | None:
        get = getattr(self.kronfluence_task, "get_attention_mask", None)
        mask = get(batch) if callable(get) else None
        if isinstance(mask, dict):
            raise NotImplementedError(
                f"{self.name}.get_attention_mask returned one mask per module; sketchattr applies one [B, T] mask to "
                "every layer: return a single tensor"
            )
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{self.name}.get_attention_mask must return a [B, T] tensor or None, got {found}")
        return mask

    def describe(self) -> str:
        return f"KronfluenceTask({self.name}, modules={self.modules!r})"

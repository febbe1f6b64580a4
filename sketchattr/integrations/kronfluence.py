"""Use a Kronfluence ``Task`` as a sketchattr :class:`~sketchattr.task.Task`, sign convention included.

Kronfluence's Task methods take ``(batch, model)`` (the ``nn.Module`` itself: sketchattr's hook
engine hands it over unchanged, so a Task may read ``model.parameters()`` or call
``checkpoint_sequential(model, ...)``); its ``compute_measurement`` is a loss-like
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

from sketchattr.featurize.selection import ModuleTypes
from sketchattr.task import Task

KRONFLUENCE_METHODS = ("compute_train_loss", "compute_measurement")
KRONFLUENCE_DEFAULT_MODULES = ModuleTypes((nn.Linear, nn.Conv2d))
"""What Kronfluence tracks when a Task names no modules: every leaf nn.Linear and nn.Conv2d."""


class KronfluenceTask(Task):
    """A sketchattr Task around a Kronfluence-style task object.

    kronfluence_task: an object with ``compute_train_loss(batch, model, sample=False)`` and
    ``compute_measurement(batch, model)`` (both summed over the batch), and optionally
    ``get_influence_tracked_modules()`` (module names, or None for all) and
    ``get_attention_mask(batch)`` (``[B, T]``, 1 = real token, or None). It need not subclass
    ``kronfluence.task.Task``: kronfluence itself is not imported.

    ``measurement = −compute_measurement`` (see the module docstring): scores equal Kronfluence's.
    ``modules`` comes from ``get_influence_tracked_modules``; when it returns None (or is absent)
    it is Kronfluence's own default, every leaf ``nn.Linear`` and ``nn.Conv2d``
    (:class:`~sketchattr.featurize.selection.ModuleTypes`), so the same modules are attributed. A
    ``[B, C, T]`` attention mask (multiple choice: C sequences per example, run as C rows of the
    model's batch) groups each example's rows; ``post_process_per_sample_gradient`` is replayed
    when it is that group sum (checked on the first batch), and refused otherwise, as are
    per-module attention masks (a dict from ``get_attention_mask``): never ignored.
    """

    def __init__(self, kronfluence_task: Any) -> None:
        missing = [m for m in KRONFLUENCE_METHODS if not callable(getattr(kronfluence_task, m, None))]
        if missing:
            raise TypeError(
                f"KronfluenceTask wraps an object with Kronfluence's Task methods {list(KRONFLUENCE_METHODS)}; "
                f"{type(kronfluence_task).__name__} lacks {missing}"
            )
        self.kronfluence_task = kronfluence_task
        self.name = type(kronfluence_task).__name__
        self.post_process = bool(getattr(kronfluence_task, "enable_post_process_per_sample_gradient", False))
        self._group_sums_checked: set[tuple[int, int]] = set()
        tracked = getattr(kronfluence_task, "get_influence_tracked_modules", None)
        names = tracked() if callable(tracked) else None
        self.modules: Sequence[str] | ModuleTypes = KRONFLUENCE_DEFAULT_MODULES if names is None else list(names)

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
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() < 2):
            found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{self.name}.get_attention_mask must return a [B, T] or [B, C, T] tensor or None, got {found}")
        if self.post_process:
            self._check_group_sum(mask)
        return mask

    def _check_group_sum(self, mask: torch.Tensor | None) -> None:
        """Accept ``post_process_per_sample_gradient`` only as the sum over each example's C rows
        (what the hook engine does for a ``[B, C, T]`` mask), tried once per ``(B, C)`` on a random tensor."""
        groups = 1 if mask is None else int(torch.tensor(mask.shape[1:-1]).prod())
        refuse = (
            f"{self.name} post-processes per-sample gradients (enable_post_process_per_sample_gradient=True); "
            "sketchattr replays that only when it sums the C rows of each example that a [B, C, T] attention mask "
            "declares (multiple choice)"
        )
        if mask is None or groups == 1:
            raise NotImplementedError(f"{refuse}, and this batch's mask is "
                                      f"{'None' if mask is None else list(mask.shape)}: return a [B, C, T] mask, or disable it")
        key = (int(mask.shape[0]), groups)
        if key in self._group_sums_checked:
            return
        probe = torch.randn(key[0] * groups, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        names = self.modules if isinstance(self.modules, list) and self.modules else [""]
        for name in names:
            out = self.kronfluence_task.post_process_per_sample_gradient(name, probe)
            expected = probe.reshape(key[0], groups, 3, 2).sum(dim=1)
            if not isinstance(out, torch.Tensor) or out.shape != expected.shape or not torch.allclose(out, expected):
                raise NotImplementedError(f"{refuse}; for module {name!r} it does something else: select the modules "
                                          "to attribute instead, or disable it")
        self._group_sums_checked.add(key)

    def describe(self) -> str:
        return f"KronfluenceTask({self.name}, modules={self.modules!r})"

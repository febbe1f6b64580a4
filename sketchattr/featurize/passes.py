"""How a featurize pass runs the model and its Task: the model on the featurizer's device and dtype
(:func:`pass_model`), only the selected parameters requiring grad (:func:`grad_only`), the Task's
position mask (:func:`task_mask`) and forward (:func:`example_runner`) for duck-typed tasks too.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import torch
from torch import nn

from sketchattr.task import Task

__all__ = ["example_runner", "grad_only", "pass_model", "task_mask"]


def pass_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The module a hook pass runs: ``model`` itself, or (when its parameters or buffers live on
    another device or in another floating dtype) a copy cast to ``device`` and ``dtype``, made
    once per pass; the model is never changed."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(_same_device(t.device, device) and (not t.is_floating_point() or t.dtype == dtype) for t in tensors):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


@contextlib.contextmanager
def grad_only(model: nn.Module, names: set[str]) -> Iterator[None]:
    """For the duration: the parameters named in ``names`` require grad and no other does (so the
    forward keeps no graph for the others); each parameter's flag is restored afterwards."""
    params = dict(model.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` (the current device) count as the same."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def task_mask(task: Task, batch: Any, device: torch.device) -> torch.Tensor | None:
    """The Task's position mask ``[B, T]`` (1 = counts) on ``device``, or None (no ``mask`` method
    on a duck-typed task, or no mask for this batch)."""
    fn = getattr(task, "mask", None)
    mask = fn(batch) if callable(fn) else None
    return None if mask is None else mask.to(device)


def example_runner(task: Task, batch: Any) -> Callable[[nn.Module], Any]:
    """``run(model)``: the task's forward on ``batch`` (or ``model(task.inputs(batch))`` for a
    duck-typed task), to trace the modules' forward order."""
    forward = getattr(task, "forward", None)
    if callable(forward):
        return lambda model: forward(model, batch)
    x = task.inputs(batch)
    return lambda model: model(**x) if isinstance(x, dict) else model(x)

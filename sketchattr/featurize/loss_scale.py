"""The loss reduction of a training step, measured: the per-example scales ``c_i`` of a
backpropagated loss ``Σ_i ℓ_i / c_i``, from its gradient and the Task's summed loss's gradient
w.r.t. the model's logits (:func:`example_scales`), and the model output with its logits swapped
for a leaf (:func:`with_logits`). Used by :mod:`sketchattr.featurize.train_time`.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["example_scales", "with_logits"]


def example_scales(task_grad: torch.Tensor, loss_grad: torch.Tensor, tol: float) -> torch.Tensor:
    """Per-example ``c [B]`` (float64) with ``task_grad[i] = c[i] · loss_grad[i]``.

    task_grad: gradient ``[B, ...]`` of the Task's summed loss w.r.t. the model's logits;
    loss_grad: gradient ``[B, ...]`` of the backpropagated loss w.r.t. the same logits. Raises
    ValueError naming the examples for which they are not positive multiples of each other
    (relative residual above ``tol``), i.e. the loop's loss is not ``Σ_i ℓ_i / c_i``."""
    if task_grad.shape != loss_grad.shape:
        raise ValueError(f"gradients of different shapes: {tuple(task_grad.shape)} and {tuple(loss_grad.shape)}")
    t = task_grad.detach().reshape(task_grad.shape[0], -1)
    g = loss_grad.detach().reshape(loss_grad.shape[0], -1).to(device=t.device, dtype=t.dtype)
    if t.dtype not in (torch.float32, torch.float64):
        t, g = t.float(), g.float()

    gg, tt, tg = (torch.linalg.vecdot(a, b, dim=1).double() for a, b in ((g, g), (t, t), (t, g)))  # [B] each
    c = torch.where(gg > 0, tg / gg.clamp_min(1e-300), torch.ones_like(gg))
    resid = torch.linalg.vector_norm(torch.addcmul(t, g, c.to(t.dtype).neg().unsqueeze(1)), dim=1).double()
    bad = (resid > tol * tt.sqrt()) | ((gg > 0) != (tt > 0)) | (c <= 0)
    if bool(bad.any()):
        rows = bad.nonzero().reshape(-1).tolist()
        i = rows[0]
        rel = float(resid[i] / tt[i].sqrt()) if tt[i] > 0 else float("inf")
        raise ValueError(
            f"the loss the training loop backpropagated is not a positive multiple of the Task's per-example training "
            f"loss for batch row(s) {rows[:10]} (row {i}: relative residual {rel:.2g}, scale {float(c[i]):.4g}). The "
            "sketcher assumes loss = Σ_i ℓ_i / c_i with ℓ_i = task.train_loss of example i: give a Task that computes "
            "the loop's loss (same targets, ignored tokens, label smoothing, weights) summed over examples"
        )
    return c


def with_logits(output: Any, leaf: torch.Tensor) -> Any:
    """``output`` with its logits (as :func:`~sketchattr.task.logits_of` finds them) replaced by
    ``leaf`` and every other tensor detached."""
    detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v
    if isinstance(output, torch.Tensor):
        return leaf
    if isinstance(getattr(output, "logits", None), torch.Tensor) and not isinstance(output, dict):
        new = copy.copy(output)
        new.logits = leaf
        return new
    if isinstance(output, dict):
        items = {k: (leaf if k == "logits" else detach(v)) for k, v in output.items()}
        try:
            return type(output)(**items)
        except TypeError:
            return items
    if isinstance(output, (tuple, list)):
        return type(output)([leaf, *(detach(v) for v in output[1:])])
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")

"""What one forward + backward of the hook engine gave: :class:`BatchCapture`.

Per block (:mod:`sketchattr.featurize.plan`), each example's exact gradient (whole, or in column
pieces formed from the Kronecker factors a few weight rows at a time) and, for Kronecker blocks,
the factors per call with padding masked; :class:`PreconditionedCapture` scales the gradients by
an optimizer preconditioner. Projectors read them through :class:`sketchattr.core.capture.Capture`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from sketchattr.featurize.plan import Block
from sketchattr.featurize.rules import (
    DenseFactor,
    Factor,
    KronLayout,
    OneHotFactor,
    UnsupportedModuleError,
)

__all__ = ["BatchCapture", "Call", "HookMismatchError", "PIECE_ELEMENTS", "PreconditionedCapture"]

PIECE_ELEMENTS = 2**22
"""Numbers in one piece of a block's exact gradient (16 MB in float32): sized to stay in cache."""


class HookMismatchError(RuntimeError):
    """The hook engine cannot see every use of a parameter (its gradients would be wrong)."""


@dataclass
class Call:
    """One call of a hooked use: what its rule saved, its output gradient ``g`` (None until the backward gives it)."""

    saved: Any
    g: torch.Tensor | None
    mask: torch.Tensor | None  # [B·group, T'] over the rule's positions, or None
    group: int = 1  # rows per example: the module ran on [B·group, ...] (choices flattened into the batch)


class BatchCapture:
    """What one forward + backward gave: per block, exact gradients and (Kronecker blocks) factors."""

    def __init__(self, blocks: list[Block], calls: dict[str, list[Call]], batch: int,
                 workspace: Callable[[int, torch.dtype, torch.device], torch.Tensor]) -> None:
        self.blocks, self.calls, self.batch, self.workspace = blocks, calls, batch, workspace

    def grads(self, k: int) -> torch.Tensor:
        """Exact per-example gradient of block ``k`` in the featurizer's flat layout: ``[B, d_k]``."""
        block = self.blocks[k]
        parts: list[torch.Tensor | None] = [None] * len(block.param_names)
        for use in block.uses:
            touched = dict(use.touched)
            for call in self.calls[use.name]:
                if call.g is None:
                    continue
                for local, grad in use.rule.grads(call.saved, call.g, frozenset(touched)).items():  # type: ignore[union-attr]
                    if call.group > 1:  # an example's rows are consecutive: its gradient is their sum
                        grad = grad.reshape(self.batch, call.group, -1).sum(dim=1)
                    i = touched[local]
                    parts[i] = grad if parts[i] is None else parts[i] + grad
        like = self._like()
        flat = [p.reshape(self.batch, -1) if p is not None else like.new_zeros(self.batch, math.prod(s))
                for p, s in zip(parts, block.shapes)]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def _pairs(self, k: int, bias_coordinate: bool = False) -> list[tuple[Factor, Factor, bool]]:
        """Block ``k``'s ``(row, col, this use has the bias)`` per call of each use, padding masked.

        ``bias_coordinate``: append the block's bias coordinate (1 on a use with the bias, 0 on a
        use without) *before* masking, so a padded position adds nothing to it either; without
        it the factors have no bias coordinate."""
        block = self.blocks[k]
        if not isinstance(block.layout, KronLayout):
            raise UnsupportedModuleError(f"block {block.describe()} has no Kronecker factors")
        side = block.layout.bias if bias_coordinate else None
        out = []
        for use in block.uses:
            has_bias = "bias" in dict(use.touched)
            for call in self.calls[use.name]:
                if call.g is None:
                    continue
                row, col = use.rule.factors(call.saved, call.g)  # type: ignore[union-attr]
                if side == "col":
                    col = col.extend(1.0 if has_bias else 0.0)
                elif side == "row":
                    row = row.extend(1.0 if has_bias else 0.0)
                if call.mask is not None:
                    row, col = row.masked(call.mask), col.masked(call.mask)
                if call.group > 1:  # an example's rows are consecutive: their positions are its positions
                    row, col = row.grouped(call.group), col.grouped(call.group)
                out.append((row, col, has_bias))
        return out

    def factors(self, k: int) -> list[tuple[Factor, Factor]]:
        """Block ``k``'s ``(row, col)`` factors per call of each use (bias coordinates appended,
        padding masked in every coordinate): ``G_i = Σ_calls Σ_t row_t col_tᵀ`` in the block's
        :class:`KronLayout`."""
        out = [(row, col) for row, col, _ in self._pairs(k, bias_coordinate=True)]
        if not out:  # no use ran with a gradient: an all-zero pair of the right widths
            like = self._like()
            r, c = self.blocks[k].layout.shape
            out.append((DenseFactor(like.new_zeros(self.batch, 1, r)), DenseFactor(like.new_zeros(self.batch, 1, c))))
        return out

    def grad_pieces(self, k: int, max_elements: int = PIECE_ELEMENTS) -> Iterator[tuple[int, torch.Tensor]]:
        """Block ``k``'s exact per-example gradient in column pieces: ``(start, [B, w])`` covering
        ``[0, d_k)`` of the flat layout. Kronecker blocks with dense factors are formed a few
        weight rows at a time (``Σ_t row_t col_tᵀ`` by ``bmm``) in the engine's reused workspace
        of about ``max_elements`` numbers: a piece is valid until the next one is yielded."""
        block = self.blocks[k]
        pairs = self._pairs(k) if block.kronecker else []
        if not pairs or not all(isinstance(c, DenseFactor) for _, c, _ in pairs):
            yield 0, self.grads(k)
            return
        lay: KronLayout = block.layout  # type: ignore[assignment]
        rows_, cols_ = lay.rows, lay.cols
        like = pairs[0][1].values
        step = max(1, min(rows_, max_elements // max(1, self.batch * cols_)))
        work = self.workspace(self.batch * step * cols_, like.dtype, like.device)
        for r0 in range(0, rows_, step):
            r1 = min(rows_, r0 + step)
            buf = work[: self.batch * (r1 - r0) * cols_].view(self.batch, r1 - r0, cols_)
            for i, (row, col, _) in enumerate(pairs):
                if isinstance(row, OneHotFactor):  # scatter the positions whose index falls in [r0, r1)
                    if i == 0:
                        buf.zero_()
                    _add_one_hot_rows(buf, row, col.values, r0, r1)
                elif i == 0:
                    torch.bmm(row.values[:, :, r0:r1].transpose(1, 2), col.values, out=buf)
                else:
                    buf.baddbmm_(row.values[:, :, r0:r1].transpose(1, 2), col.values)
            yield r0 * cols_, buf.view(self.batch, -1)
        if lay.bias is not None:  # the bias coordinate is a constant 1: Σ_t of the other side
            sums = [(row if lay.bias == "col" else col).values.sum(dim=1) for row, col, has in pairs if has]
            width = rows_ if lay.bias == "col" else cols_
            yield rows_ * cols_, sum(sums) if sums else like.new_zeros(self.batch, width)

    def example(self, i: int) -> "BatchCapture":
        """The capture of example ``i`` alone (a batch of one, sharing the tensors)."""
        def pick(t: Any, group: int) -> Any:
            if isinstance(t, torch.Tensor):
                return t[i * group : (i + 1) * group]
            if isinstance(t, (tuple, list)):
                return type(t)(pick(x, group) for x in t)
            return {k: pick(v, group) for k, v in t.items()} if isinstance(t, dict) else t

        calls = {n: [Call(pick(c.saved, c.group), pick(c.g, c.group), pick(c.mask, c.group), c.group) for c in cs]
                 for n, cs in self.calls.items()}
        return BatchCapture(self.blocks, calls, 1, self.workspace)

    def _like(self) -> torch.Tensor:
        for calls in self.calls.values():
            for call in calls:
                if call.g is not None:
                    return call.g
        raise HookMismatchError("no hooked module received a gradient: the loss does not depend on the selected modules")


class PreconditionedCapture:
    """A :class:`BatchCapture` whose exact gradients are scaled elementwise by a preconditioner
    (``scale(param_names, dtype, device) -> [d_k]``) — pieces in place, block by block."""

    def __init__(self, capture: BatchCapture, preconditioner: Any, param_names: tuple[tuple[str, ...], ...]) -> None:
        self.capture, self.preconditioner, self.param_names = capture, preconditioner, param_names
        self.blocks, self.batch = capture.blocks, capture.batch

    def grads(self, k: int) -> torch.Tensor:
        g = self.capture.grads(k)
        return g * self.preconditioner.scale(self.param_names[k], g.dtype, g.device)

    def grad_pieces(self, k: int, max_elements: int = PIECE_ELEMENTS) -> Iterator[tuple[int, torch.Tensor]]:
        for start, piece in self.capture.grad_pieces(k, max_elements):
            s = self.preconditioner.scale(self.param_names[k], piece.dtype, piece.device)
            yield start, piece.mul_(s[start : start + piece.shape[1]])

    def factors(self, k: int) -> list[tuple[Factor, Factor]]:
        raise UnsupportedModuleError("a preconditioned gradient has no Kronecker factors")


def _add_one_hot_rows(buf: torch.Tensor, row: OneHotFactor, col: torch.Tensor, r0: int, r1: int) -> None:
    """``buf [B, r1 − r0, C] += Σ_t e_{idx − r0} col_tᵀ`` over the positions with ``r0 <= idx < r1``."""
    idx = row.index
    b, t = ((idx >= r0) & (idx < r1)).nonzero(as_tuple=True)
    if len(b) == 0:
        return
    vals = col[b, t]
    if row.weight is not None:
        vals = vals * row.weight[b, t].unsqueeze(-1).to(vals.dtype)
    flat = buf.view(-1, buf.shape[-1])
    flat.index_add_(0, b * (r1 - r0) + (idx[b, t] - r0), vals)

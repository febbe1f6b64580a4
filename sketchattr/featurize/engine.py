"""The hook engine: exact per-example gradients, Kronecker factors and masks from one forward + backward.

One engine serves every hook-based path: the featurizer's exact gradients (then any projector),
the factorized sketches and the EKFAC/KFAC/diagonal statistics of
:func:`~sketchattr.curvature.fit_factors`.

**Plan.** Each selected module is a *block*: its own trainable parameters (a tied parameter
belongs to its first module, see :mod:`sketchattr.featurize.selection`). A block's *uses* are every module
holding one of its parameters directly (GPT-2's ``wte`` block is used by ``wte`` and
``lm_head``); each use has a :class:`~sketchattr.featurize.rules.LayerRule`. A block is
*covered* when every use has a rule; it is *Kronecker* when every use is a Kronecker rule on the
same ``[rows, cols]`` weight, and then has a :class:`KronLayout`; otherwise a ``FlatLayout``.

**Capture.** Forward hooks on the uses keep what each rule needs and hand on a copy of the
output; one ``torch.autograd.grad`` of the summed loss w.r.t. the hooked outputs gives each
call's output gradient ``g`` (no parameter gradient is formed). With a Task mask ``[B, T]``,
positions where it is 0 are zeroed in ``g`` and in both factors of sequence layers (outputs
``[B, T, …]``), so padding never enters a gradient or a statistic.

**Recording a training step.** :meth:`HookEngine.record` / :meth:`HookEngine.recorded` capture the
caller's own forward and ``loss.backward()`` instead (tensor hooks on the hooked outputs keep
``g``), with a per-example ``scale`` for a loss that was a weighted sum of the examples' losses
(a mean over examples or tokens): :mod:`sketchattr.featurize.train_time` builds a store while
training this way.

**Broadcast calls.** A module run once for the whole batch with a leading dimension of 1 (Hugging
Face position embeddings on ``position_ids [1, T]``) is expanded to the batch in its hook, so each
example's share of the gradient is its own.

**Safety.** A hooked output whose leading dimension is neither the batch size nor 1 is refused
(inputs flattened over the batch, position embeddings without a batch dimension), and
:meth:`HookEngine.verify` compares the first example's gradient with plain autograd on that
example alone, which catches parameters used outside their module's forward (``h @ wte.weight.T``,
``nn.MultiheadAttention``'s ``out_proj``) and examples that interact in the forward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from sketchattr.featurize.rules import (
    DenseFactor,
    Factor,
    FlatLayout,
    KroneckerRule,
    KronLayout,
    LayerRule,
    OneHotFactor,
    UnsupportedModuleError,
    rule_for,
)
from sketchattr.featurize.selection import ModuleSelection, parameter_users

__all__ = ["Block", "BatchCapture", "HookEngine", "HookMismatchError", "Use", "plan_blocks"]

PIECE_ELEMENTS = 2**22
"""Numbers in one piece of a block's exact gradient (16 MB in float32): sized to stay in cache."""


class HookMismatchError(RuntimeError):
    """The hook engine cannot see every use of a parameter (its gradients would be wrong)."""


@dataclass(frozen=True)
class Use:
    """A module that holds some of a block's parameters: ``touched`` maps its local parameter
    names to their positions in the block."""

    name: str
    module: nn.Module
    rule: LayerRule | None
    touched: tuple[tuple[str, int], ...]

    @property
    def problem(self) -> str:
        """Why the hook engine cannot differentiate this use ("" if it can)."""
        if self.rule is None:
            return f"{type(self.module).__name__}: no layer rule"
        issue = self.rule.problem()
        return f"{issue}" if issue else ""


@dataclass(frozen=True)
class Block:
    """One selected module's parameters: names (full), shapes, matrix layout and uses."""

    name: str
    param_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    layout: "KronLayout | FlatLayout"
    uses: tuple[Use, ...]
    containers: tuple[str, ...] = ()
    """Modules holding the parameters without a rule, taken to only hand them on to ``uses``."""

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def covered(self) -> bool:
        return all(not u.problem for u in self.uses)

    @property
    def kronecker(self) -> bool:
        return self.layout.kronecker

    @property
    def diagonal_rows(self) -> bool:
        """Every use's row factor is one-hot (an untied Embedding): the row second moment is diagonal."""
        return self.kronecker and all(getattr(u.rule, "one_hot_rows", False) for u in self.uses)

    def describe(self) -> str:
        """``name (rule[, rule of a tied use ...])``."""
        rules = [u.rule.name if u.rule is not None else type(u.module).__name__ + "?" for u in self.uses]
        return f"{self.name or '<root>'} ({', '.join(rules)})"


def plan_blocks(model: nn.Module, selection: ModuleSelection) -> list[Block]:
    """The blocks of ``selection`` with their uses, rules and layouts."""
    named = dict(model.named_parameters())
    modules = dict(model.named_modules())
    users = parameter_users(model)
    rules: dict[str, LayerRule | None] = {}
    blocks = []
    for name, pnames in zip(selection.names, selection.param_names):
        params = [named[p] for p in pnames]
        position = {id(p): i for i, p in enumerate(params)}
        use_names = list(dict.fromkeys(u for p in params for u in users[id(p)]))
        uses = []
        for un in use_names:
            module = modules[un]
            if un not in rules:
                rules[un] = rule_for(module)
            touched = tuple((local, position[id(p)]) for local, p in module.named_parameters(recurse=False) if id(p) in position)
            uses.append(Use(un, module, rules[un], touched))
        # a holder without a rule whose parameters other (ruled) uses also hold is taken for a
        # container that only hands them on (BERT's prediction head holding its decoder's bias);
        # the first-batch check against autograd catches a container that uses them itself
        ruled = {i for u in uses if u.rule is not None for _, i in u.touched}
        containers = tuple(u.name for u in uses if u.rule is None and all(i in ruled for _, i in u.touched))
        uses = [u for u in uses if u.name not in containers]
        prefix = f"{name}." if name else ""
        locals_ = tuple(p[len(prefix):] for p in pnames)
        layout = _kron_layout(locals_, uses, name) or FlatLayout(sum(p.numel() for p in params))
        blocks.append(Block(name, tuple(pnames), tuple(tuple(p.shape) for p in params), layout, tuple(uses), containers))
    return blocks


def _kron_layout(locals_: tuple[str, ...], uses: list[Use], owner: str) -> KronLayout | None:
    """The block's KronLayout when every use is a Kronecker rule on the same weight, else None."""
    if "weight" not in locals_ or set(locals_) - {"weight", "bias"}:
        return None
    w_index = locals_.index("weight")
    base = None
    for use in uses:
        if not isinstance(use.rule, KroneckerRule) or use.problem:
            return None
        touched = dict(use.touched)
        if touched.get("weight") != w_index or set(touched) - {"weight", "bias"}:
            return None
        lay = use.rule.layout()
        if use.name == owner:
            base = lay
        if "bias" in touched and lay.bias is None:
            return None
        if base is not None and (lay.rows, lay.cols) != (base.rows, base.cols):
            return None
    if base is None:
        return None
    shapes = {(u.rule.layout().rows, u.rule.layout().cols) for u in uses}  # type: ignore[union-attr]
    if len(shapes) != 1:
        return None
    sides = {u.rule.layout().bias for u in uses if "bias" in dict(u.touched)}  # type: ignore[union-attr]
    if len(sides) > 1:
        return None
    return KronLayout(base.rows, base.cols, base.bias if "bias" in locals_ else None)


@dataclass
class _Call:
    saved: Any
    g: torch.Tensor | None
    mask: torch.Tensor | None  # [B·group, T'] over the rule's positions, or None
    group: int = 1  # rows per example: the module ran on [B·group, ...] (choices flattened into the batch)


class BatchCapture:
    """What one forward + backward gave: per block, exact gradients and (Kronecker blocks) factors."""

    def __init__(self, blocks: list[Block], calls: dict[str, list[_Call]], batch: int,
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
        flat = [p.reshape(self.batch, -1) if p is not None else like.new_zeros(self.batch, _numel(s))
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

        calls = {n: [_Call(pick(c.saved, c.group), pick(c.g, c.group), pick(c.mask, c.group), c.group) for c in cs]
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


def _check_mask(mask: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.detach()
    if mask.dim() < 2 or mask.shape[0] != batch_size:
        raise ValueError(f"a mask must be [B, T] (or [B, C, T] for C sequences per example, e.g. multiple choice) "
                         f"with B = {batch_size}; found shape {tuple(mask.shape)}")
    return mask


def _groups(mask: torch.Tensor | None) -> int:
    """Sequences per example a mask declares: C for ``[B, C, T]`` (product of the middle dims), else 1."""
    return 1 if mask is None else _numel(tuple(mask.shape[1:-1]))


def _set_grad(call: _Call, g: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
    """``call.g``: the output gradient ``g`` with masked positions zeroed and example i scaled by ``scale[i]``."""
    if g is not None:
        g = g.detach()
        factor = None
        if call.mask is not None:
            m = call.mask.reshape(*g.shape[:-1]) if g.dim() >= 3 else call.mask
            factor = m.unsqueeze(-1).to(g.dtype)
        if scale is not None:
            s = scale.to(device=g.device, dtype=g.dtype).repeat_interleave(call.group)
            s = s.reshape(-1, *([1] * (g.dim() - 1)))
            factor = s if factor is None else factor * s
        if factor is not None:
            g = g * factor
    call.g = g


def _expand(t: Any, batch: int) -> Any:
    """A tensor with leading dim 1 broadcast to ``batch`` (other values unchanged)."""
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    return t


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class HookEngine:
    """Hooks over the uses of the selected blocks; see the module docstring.

    ``blocks``: the plan. ``covered``: every block has rules for all its uses (else the
    featurizer falls back to vmap; :meth:`uncovered` says which modules and why).
    """

    def __init__(self, model: nn.Module, selection: ModuleSelection) -> None:
        self.model = model
        self.selection = selection
        self.blocks = plan_blocks(model, selection)
        self._uses: dict[str, Use] = {u.name: u for b in self.blocks for u in b.uses}
        self._handles: list[Any] = []
        self._active = False
        self._calls: dict[str, list[_Call]] = {}
        self._pending: list[tuple[str, int, torch.Tensor]] = []
        self._kept: dict[tuple[str, int], torch.Tensor] | None = None  # recording: grads kept by tensor hooks
        self._batch = 0
        self._mask: torch.Tensor | None = None
        self._groups = 1  # sequences per example (a [B, C, T] mask: C)
        self._without_grad: list[str] = []  # hooked modules that ran while autograd was off
        self._workspace: dict[tuple[torch.dtype, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ plan facts
    @property
    def covered(self) -> bool:
        return all(b.covered for b in self.blocks)

    def uncovered(self) -> list[str]:
        """``"module (why)"`` for every use without a usable rule."""
        return [f"{u.name or '<root>'} ({u.problem})" for u in self._uses.values() if u.problem]

    def require(self, purpose: str, remedy: str) -> None:
        """Raise :class:`UnsupportedModuleError` unless every block is covered."""
        bad = self.uncovered()
        if bad:
            rules = ", ".join(LayerRule.registry)
            raise UnsupportedModuleError(
                f"{purpose} needs a layer rule for every selected module (rules: {rules}); "
                f"unsupported: {', '.join(bad)}. {remedy}"
            )

    def report(self) -> str:
        """A table: block, parameters, rules of its uses, Kronecker or flat."""
        width = max([len(b.name) for b in self.blocks] + [6])
        lines = [f"{'module':<{width}}  {'params':>10}  layout  rules"]
        for b in self.blocks:
            kind = "kron" if b.kronecker else "flat"
            rules = ", ".join(f"{u.name}:{u.rule.name if u.rule else 'NONE'}" if u.name != b.name else (u.rule.name if u.rule else "NONE") for u in b.uses)
            lines.append(f"{b.name or '<root>':<{width}}  {b.dim:>10,}  {kind:<6}  {rules}")
        if not self.covered:
            lines.append("no rule (vmap fallback): " + ", ".join(self.uncovered()))
        return "\n".join(lines)

    def workspace(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least ``numel`` numbers, kept across batches (a fresh large
        allocation per batch costs page faults that dominate on CPU)."""
        key = (dtype, str(device))
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[key] = buf
        return buf

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def attached(self) -> Iterator["HookEngine"]:
        """Register the forward hooks for the duration of a pass."""
        self.require("the hook engine", "")
        try:
            for name, use in self._uses.items():
                self._handles.append(use.module.register_forward_hook(self._hook(name, use)))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def _hook(self, name: str, use: Use) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if not self._active:
                return None
            if not torch.is_grad_enabled():  # a call without autograd adds nothing to a gradient (a task's
                self._without_grad.append(name)  # no-grad forward; reentrant checkpointing's first run)
                return None
            if not isinstance(output, torch.Tensor):
                raise HookMismatchError(f"module {name!r} returned {type(output).__name__}, not a tensor")
            shared = output.dim() > 0 and output.shape[0] == 1 and self._batch > 1
            group = self._groups if output.dim() > 0 and output.shape[0] == self._batch * self._groups else 1
            if shared:  # run once for the whole batch and broadcast (HF position embeddings): expand per example
                output = output.expand(self._batch, *output.shape[1:])
                inputs = tuple(_expand(i, self._batch) for i in inputs)
            elif output.dim() == 0 or output.shape[0] != self._batch * group:
                grouped = f" (or {self._batch * self._groups}: {self._groups} sequences per example, as the mask says)" if self._groups > 1 else ""
                raise HookMismatchError(
                    f"module {name!r} ({type(module).__name__}) returned shape {tuple(output.shape)} for a batch of "
                    f"{self._batch}{grouped}: it does not run once per example (e.g. inputs flattened over the batch, or "
                    "position embeddings called without a batch dimension), so per-example gradients cannot be read "
                    "from its hooks. A model that runs C sequences per example as C rows of its batch (multiple "
                    "choice) needs a Task mask of shape [B, C, T] to say so"
                )
            self._active = False  # a rule may call its module again (norms): no nested capture
            try:
                saved = use.rule.save(inputs, output)  # type: ignore[union-attr]
            finally:
                self._active = True
            calls = self._calls.setdefault(name, [])
            calls.append(_Call(saved, None, self._positions_mask(use, output, group), group))
            if output.requires_grad:
                if self._kept is not None:  # recording: the caller's own backward hands g to a tensor hook, which
                    output.register_hook(self._keeper(name, len(calls) - 1))  # sees the output as the module made it
                    return output if shared else None  # (even if later ops change it in place): no copy needed
                self._pending.append((name, len(calls) - 1, output))
                return output.clone()  # later in-place ops change the copy, not the captured output
            return output if shared else None

        return hook

    def _positions_mask(self, use: Use, output: torch.Tensor, group: int) -> torch.Tensor | None:
        """The mask over this call's positions ``[B·group, T']``, or None (no mask, or not a
        sequence output ``[B·group, T, …]`` the mask fits)."""
        mask = self._mask
        if mask is None or (mask.dim() > 2 and group == 1):  # a [B, C, T] mask fits grouped calls only
            return None
        mask = mask.reshape(-1, mask.shape[-1])
        if not use.rule.sequence or output.dim() < 3 or output.shape[:2] != mask.shape:  # type: ignore[union-attr]
            return None
        extra = output.dim() - 3
        m = mask.reshape(*mask.shape, *([1] * extra)).expand(*output.shape[:-1])
        return m.reshape(output.shape[0], -1)

    def run(self, loss_fn: Callable[[], torch.Tensor], batch_size: int, mask: torch.Tensor | None = None) -> BatchCapture:
        """Evaluate ``loss_fn()`` (summed over a batch of ``batch_size``), backpropagate to the hooked
        outputs and return the :class:`BatchCapture`. ``mask``: ``[B, T]``, 1 where a position counts."""
        if not self._handles:
            raise RuntimeError("HookEngine.run needs the hooks attached: use `with engine.attached():`")
        mask = _check_mask(mask, batch_size)
        self._calls, self._pending, self._batch, self._mask = {}, [], batch_size, mask
        self._groups, self._without_grad = _groups(mask), []
        self._active = True
        try:
            loss = loss_fn()
        finally:
            self._active = False
        try:
            if not self._pending and self._without_grad:
                raise HookMismatchError(
                    f"the selected modules ran only without autograd ({', '.join(dict.fromkeys(self._without_grad))}), "
                    "so no per-example gradient can be read from their hooks: under torch.no_grad(), or inside "
                    "reentrant activation checkpointing (use_reentrant=True; Hugging Face: "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), "
                    "or disable checkpointing while attributing)"
                )
            if self._pending:
                grads = torch.autograd.grad(loss, [o for _, _, o in self._pending], allow_unused=True)
                for (name, c, _), g in zip(self._pending, grads):
                    _set_grad(self._calls[name][c], g)
            calls = {n: self._calls.get(n, []) for n in self._uses}
            return BatchCapture(self.blocks, calls, batch_size, self.workspace)
        finally:
            self._pending, self._mask = [], None

    # ------------------------------------------------------------------ recording a caller's own step
    def record(self, batch_size: int, mask: torch.Tensor | None = None) -> None:
        """Capture the caller's next forward and backward (a training step's own) instead of
        :meth:`run`'s ``autograd.grad``: the forward hooks save what the rules need as usual and put
        a tensor hook on each hooked output that keeps ``g`` when the caller's ``loss.backward()``
        reaches it (``.grad`` of the parameters is formed by the caller's backward as usual).
        Then :meth:`stop_forward` (optional) and, after the backward, :meth:`recorded`.
        ``mask``: ``[B, T]``, 1 where a position counts."""
        if not self._handles:
            raise RuntimeError("HookEngine.record needs the hooks attached: use `with engine.attached():`")
        mask = _check_mask(mask, batch_size)
        self._calls, self._pending, self._kept, self._batch, self._mask = {}, [], {}, batch_size, mask
        self._groups, self._without_grad = _groups(mask), []
        self._active = True

    def stop_forward(self) -> None:
        """Capture no further forward call of this recording (its forward is over)."""
        self._active = False

    def recorded(self, scale: torch.Tensor | None = None) -> BatchCapture:
        """End a :meth:`record`-ing: the :class:`BatchCapture` of its forward and backward. ``scale``
        ``[B]``: multiplies example i's output gradients (a loss that weighted example i by
        ``1/scale[i]`` gives the gradients of its unweighted loss; every rule is linear in ``g``)."""
        if self._kept is None:
            raise RuntimeError("HookEngine.recorded: no recording was started (call record() first)")
        self._active = False
        kept, self._kept = self._kept, None
        try:
            for name, calls in self._calls.items():
                for c, call in enumerate(calls):
                    _set_grad(call, kept.get((name, c)), scale)
            calls = {n: self._calls.get(n, []) for n in self._uses}
            return BatchCapture(self.blocks, calls, self._batch, self.workspace)
        finally:
            self._calls, self._mask = {}, None

    def discard(self) -> None:
        """Drop a recording (and anything it holds) without building a capture."""
        self._active, self._kept, self._calls, self._mask = False, None, {}, None

    def _keeper(self, name: str, c: int) -> Callable[[torch.Tensor], None]:
        kept = self._kept  # this recording's: a late backward of an earlier graph never reaches a later recording

        def keep(g: torch.Tensor) -> None:
            if kept is not None:
                kept[(name, c)] = g.detach()
        return keep

    # ------------------------------------------------------------------ verification
    def verify(self, capture: BatchCapture, single_loss: Callable[[], torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        """Check the captured gradient of example 0 against autograd of ``single_loss()`` (that
        example alone, the same loss) w.r.t. ``params`` (the tensors the forward used, by full
        name). Raises :class:`HookMismatchError` naming the blocks that disagree."""
        tensors = [params[p] for b in self.blocks for p in b.param_names]
        loss = single_loss()
        ref = torch.autograd.grad(loss, tensors, allow_unused=True)
        ref_flat, i = [], 0
        for b in self.blocks:
            parts = []
            for _ in b.param_names:
                r = ref[i]
                parts.append(r.reshape(-1) if r is not None else tensors[i].new_zeros(tensors[i].numel()))
                i += 1
            ref_flat.append(torch.cat(parts))
        total = float(torch.sqrt(sum((r.double() ** 2).sum() for r in ref_flat)))
        tol = {torch.float64: 1e-6, torch.float32: 2e-3}.get(ref_flat[0].dtype, 5e-2)
        bad = []
        first = capture.example(0)
        for k, (b, r) in enumerate(zip(self.blocks, ref_flat)):
            ours = first.grads(k)[0].to(r.dtype)
            err, size = float((ours - r).double().norm()), float(r.double().norm())
            if err > tol * size + tol * 1e-3 * total:
                bad.append(f"{b.describe()}: relative error {err / max(size, 1e-30):.2g}")
        if bad:
            raise HookMismatchError(
                "per-example gradients from the hooks differ from autograd on a single example for "
                + "; ".join(bad)
                + ". Usual causes: a parameter used outside its module's forward (e.g. a tied output layer "
                "written as h @ wte.weight.T, or nn.MultiheadAttention reading out_proj.weight), a module run once "
                "for the whole batch, or examples that interact in the forward (BatchNorm in training mode)."
            )

"""The hook engine: exact per-example gradients, Kronecker factors and masks from one forward + backward.

One engine serves every hook-based path: the featurizer's exact gradients (then any projector),
the factorized sketches and the EKFAC/KFAC/diagonal statistics of
:func:`~sketchattr.curvature.fit_factors`.

**Plan** (:mod:`sketchattr.featurize.plan`). Each selected module is a block of parameters; its
uses are every module holding one of them, each with a layer rule.

**Capture.** Forward hooks on the uses keep what each rule needs and hand on a copy of the
output; one ``torch.autograd.grad`` of the summed loss w.r.t. the hooked outputs gives each
call's output gradient ``g`` (no parameter gradient is formed); the rules turn them into a
:class:`~sketchattr.featurize.capture.BatchCapture`. With a Task mask ``[B, T]``,
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
import math
from typing import Any, Callable, Iterator

import torch
from torch import nn

from sketchattr.featurize.capture import BatchCapture, Call, HookMismatchError
from sketchattr.featurize.plan import Block, Use, plan_blocks
from sketchattr.featurize.rules import LayerRule, UnsupportedModuleError
from sketchattr.featurize.selection import ModuleSelection

VERIFY_ELEMENTS = 2**25
"""Parameters whose reference gradients one step of :meth:`HookEngine.verify` forms at once (256 MB in float64)."""

__all__ = ["HookEngine"]


def _check_mask(mask: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.detach()
    if mask.dim() < 2 or mask.shape[0] != batch_size:
        raise ValueError(f"a mask must be [B, T] (or [B, C, T] for C sequences per example, e.g. multiple choice) "
                         f"with B = {batch_size}; found shape {tuple(mask.shape)}")
    return mask


def _chunks(blocks: list[Block], max_elements: int) -> list[list[Block]]:
    """Consecutive blocks grouped so each group holds at most ``max_elements`` parameters (a block
    larger than that forms a group alone)."""
    groups: list[list[Block]] = []
    size = 0
    for b in blocks:
        if groups and size + b.dim <= max_elements:
            groups[-1].append(b)
            size += b.dim
        else:
            groups.append([b])
            size = b.dim
    return groups


def _groups(mask: torch.Tensor | None) -> int:
    """Sequences per example a mask declares: C for ``[B, C, T]`` (product of the middle dims), else 1."""
    return 1 if mask is None else math.prod(mask.shape[1:-1])


def _set_grad(call: Call, g: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
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


class HookEngine:
    """Hooks over the uses of the selected blocks; see the module docstring.

    ``blocks``: the plan. ``covered``: every block has rules for all its uses (else the
    featurizer falls back to vmap; :meth:`uncovered` says which modules and why).
    """

    def __init__(self, model: nn.Module, selection: ModuleSelection) -> None:
        self.model = model
        self.selection = selection
        self.blocks: list[Block] = plan_blocks(model, selection)
        self._uses: dict[str, Use] = {u.name: u for b in self.blocks for u in b.uses}
        self._handles: list[Any] = []
        self._active = False
        self._calls: dict[str, list[Call]] = {}
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
            calls.append(Call(saved, None, self._positions_mask(use, output, group), group))
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
    def verify(self, capture: BatchCapture, single_loss: Callable[[], torch.Tensor],
               max_elements: int = VERIFY_ELEMENTS) -> None:
        """Check the captured gradient of example 0 against autograd of ``single_loss()`` (that
        example alone, the same loss) w.r.t. the parameter tensors its forward used (recorded from
        the modules as they run: for a ``fully_shard``-ed model, the gathered weights, never the
        shards). Blocks are checked in groups of at most ``max_elements`` parameters, one forward
        and backward each, so no whole-model gradient is formed. Raises :class:`HookMismatchError`
        naming the blocks that disagree."""
        first = capture.example(0)
        errors: list[tuple[Block, float, float]] = []
        dtype = None
        for chunk in _chunks(self.blocks, max_elements):
            for b, ref in zip(chunk, self._reference_grads(chunk, single_loss)):
                ours = first.grads(self.blocks.index(b))[0].to(ref.dtype)
                errors.append((b, float((ours - ref).double().norm()), float(ref.double().norm())))
                dtype = ref.dtype
        total = math.sqrt(sum(size ** 2 for _, _, size in errors))
        tol = {torch.float64: 1e-6, torch.float32: 2e-3}.get(dtype, 5e-2)
        bad = [f"{b.describe()}: relative error {err / max(size, 1e-30):.2g}"
               for b, err, size in errors if err > tol * size + tol * 1e-3 * total]
        if bad:
            raise HookMismatchError(
                "per-example gradients from the hooks differ from autograd on a single example for "
                + "; ".join(bad)
                + ". Usual causes: a parameter used outside its module's forward (e.g. a tied output layer "
                "written as h @ wte.weight.T, or nn.MultiheadAttention reading out_proj.weight), a module run once "
                "for the whole batch, or examples that interact in the forward (BatchNorm in training mode)."
            )

    def _reference_grads(self, blocks: list[Block], single_loss: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        """Autograd's gradient ``[d_k]`` of ``single_loss()`` for each of ``blocks``, w.r.t. the
        parameter tensors each use module held when it ran (zeros for a parameter no use ran with)."""
        used: dict[tuple[int, int], torch.Tensor] = {}

        def recorder(k: int, use: Use) -> Callable:
            def record(module: nn.Module, _inputs: Any) -> None:
                for local, position in use.touched:
                    used.setdefault((k, position), getattr(module, local))
            return record

        handles = [u.module.register_forward_pre_hook(recorder(k, u)) for k, b in enumerate(blocks) for u in b.uses]
        try:
            loss = single_loss()
        finally:
            for h in handles:
                h.remove()
        keys = sorted(used)
        grads = dict(zip(keys, torch.autograd.grad(loss, [used[k] for k in keys], allow_unused=True))) if keys else {}
        out = []
        for k, b in enumerate(blocks):
            parts = []
            for position, shape in enumerate(b.shapes):
                g = grads.get((k, position))
                parts.append(g.reshape(-1) if g is not None else loss.new_zeros(math.prod(shape)))
            out.append(torch.cat(parts))
        return out

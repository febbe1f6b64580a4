"""The featurizer's fallback path: per-example gradients by ``torch.func`` (``vmap`` over ``grad`` of a
``functional_call``) for models with a module no layer rule covers, and :class:`VmapError`, which
names the module it failed in and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from sketchattr.core.batches import batch_len, tree_map
from sketchattr.featurize.selection import ModuleSelection
from sketchattr.task import Task

__all__ = ["VmapError", "VmapGradients"]


class VmapError(RuntimeError):
    """``torch.func.vmap`` could not differentiate the model per example (the fallback path)."""


@dataclass(frozen=True)
class VmapGradients:
    """Per-example gradients of ``task``'s loss by vmap, on ``device`` in ``dtype`` (the model's
    parameters and buffers are cast copies; the model is never changed)."""

    model: nn.Module
    task: Task
    device: torch.device
    dtype: torch.dtype

    def rows(
        self,
        sel: ModuleSelection,
        kind: str,
        sample: bool,
        project: Callable[[list[torch.Tensor]], torch.Tensor],
        scale: Callable[[tuple[str, ...], torch.dtype, torch.device], torch.Tensor] | None = None,
        uncovered: Sequence[str] = (),
    ) -> Callable[[Any], torch.Tensor]:
        """batch -> ``project(blocks)``, one flat block ``[B, d_k]`` per selected module, each scaled
        elementwise by ``scale(param_names, dtype, device)`` when given. ``uncovered``: the modules
        without a layer rule, named in a :class:`VmapError`."""
        per_example = self.per_example_fn(kind, sample)
        params, frozen = self.split_state(sel)

        def rows(batch: Any) -> torch.Tensor:
            try:
                grads = vmap(grad(per_example), in_dims=(None, None, 0), randomness="different")(params, frozen, batch)
            except Exception as exc:  # noqa: BLE001 - re-raised with the module and the fix named
                raise self.error(exc, per_example, params, frozen, batch, uncovered) from exc
            n = batch_len(batch)
            blocks = [torch.cat([grads[p].reshape(n, -1) for p in group], dim=1) for group in sel.param_names]
            if scale is not None:
                blocks = [g * scale(group, g.dtype, g.device) for g, group in zip(blocks, sel.param_names)]
            return project(blocks)

        return rows

    def per_example_fn(self, kind: str, sample: bool) -> Callable:
        """``fn(params, frozen, example)``: the training loss (``kind="train"``) or the measurement of
        one example, the model run by ``functional_call``."""
        model, task = self.model, self.task

        def fn(params: dict, frozen: dict, example: Any) -> torch.Tensor:
            batch = tree_map(lambda t: t.unsqueeze(0), example)

            def call(*args: Any, **kwargs: Any) -> torch.Tensor:
                return functional_call(model, (params, frozen), args, kwargs)

            if kind == "train":
                return task.train_loss(call, batch, sample=sample)
            return task.measurement(call, batch)

        return fn

    def split_state(self, sel: ModuleSelection) -> tuple[dict, dict]:
        """(selected parameters, other parameters and buffers), detached and cast to the
        device/dtype: the inputs of the ``functional_call``."""
        chosen = set(p for g in sel.param_names for p in g)
        cast = lambda t: t.detach().to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)
        params = {n: cast(p) for n, p in self.model.named_parameters() if n in chosen}
        frozen = {n: cast(p) for n, p in self.model.named_parameters() if n not in chosen}
        frozen.update({n: cast(b) for n, b in self.model.named_buffers()})
        return params, frozen

    def error(self, exc: Exception, per_example: Callable, params: dict, frozen: dict, batch: Any,
              uncovered: Sequence[str] = ()) -> VmapError:
        """A :class:`VmapError` naming the innermost module that was running when vmap failed."""
        stack: list[str] = []
        failed: list[str] = []
        names = {id(m): n for n, m in self.model.named_modules()}

        def push(module: nn.Module, _inputs: Any) -> None:
            stack.append(names.get(id(module), type(module).__name__))

        def pop(module: nn.Module, _inputs: Any, _output: Any) -> None:
            if stack:
                stack.pop()

        handles = [m.register_forward_pre_hook(push) for m in self.model.modules()]
        handles += [m.register_forward_hook(pop) for m in self.model.modules()]
        try:
            vmap(grad(per_example), in_dims=(None, None, 0), randomness="different")(params, frozen, batch)
        except Exception:  # noqa: BLE001 - the same failure, now with the module stack recorded
            failed = list(stack)
        finally:
            for h in handles:
                h.remove()
        modules = dict(self.model.named_modules())
        where = f"inside module {failed[-1]!r} ({type(modules[failed[-1]]).__name__})" if failed and failed[-1] in modules else "in the model's forward"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        data_dependent = any(w in str(exc) for w in (".item()", "data-dependent", "Data-dependent", "vmap"))
        cause = (
            "its forward has data-dependent control flow (.item(), `if` on tensor values, boolean indexing), "
            "which torch.func.vmap cannot batch — Hugging Face attention masks are a common case"
            if data_dependent else "torch.func.vmap could not run it per example"
        )
        if isinstance(exc, AttributeError) and "'function' object" in str(exc):
            cause = ("the Task reads its model (model.parameters(), model.config, ...), but the vmap fallback hands it "
                     "a function of the parameters, not the module (the hook engine hands it the module)")
        fix = (
            "Fixes: select only modules that have layer rules so the hook engine runs and no vmap is needed "
            f"(without a rule here: {', '.join(uncovered) or 'none'}; see Featurizer.describe()), or load a Hugging Face "
            "model with attn_implementation='eager'."
        )
        return VmapError(f"per-example gradients by torch.func.vmap failed {where}: {cause}. {fix} Original error: {type(exc).__name__}: {text}")

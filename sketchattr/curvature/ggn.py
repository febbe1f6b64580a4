"""Exact Gauss-Newton products over a training set: ``G V`` without ever forming G.

``G = (1/N) Σ_i J_iᵀ H_i J_i`` for the selected parameters θ (the other parameters held fixed),
where J_i is the Jacobian of example i's model output z_i (the logits) and H_i the Hessian of the
Task's training loss with respect to z_i. For cross-entropy and squared error this is the true
Fisher exactly — the matrix whose Kronecker approximation EKFAC's factors are (same units: the
second moment of the per-example training-loss gradients, averaged over N examples), so one can
refine EKFAC's inverse with it. Padded positions drop out by themselves: the loss ignores them, so
their rows of H are zero.

Per batch, with the output z captured by a forward hook and a dummy cotangent w:
``Jv = ∂/∂w ⟨Jᵀw, v⟩`` (double backward), ``H Jv = ∂/∂z ⟨∇_z ℓ, Jv⟩``, ``Jᵀ(H Jv)`` by backward;
every vector of ``V`` at once (``is_grads_batched``). A product costs about four backward passes
over the data: :attr:`GGNProducts.passes` counts the data passes made.

Vectors are flat ``[Q, d]`` in the featurizer's layout (each selected module's parameters in
registration order, each flattened as stored), so they pair with query gradients and store rows.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from sketchattr.core.batches import as_dataset, tree_map
from sketchattr.curvature.passes import caster
from sketchattr.featurize.selection import ModuleSelection, unwrap_model
from sketchattr.featurize.sharding import ShardedModelError, sharding_of
from sketchattr.task import Task, logits_of

__all__ = ["GGNProducts"]


class GGNProducts:
    """``G V`` ``[Q, d]`` -> ``[Q, d]`` over ``dataset`` (the first ``max_examples`` rows, default all;
    a Dataset, a tuple of tensors or a DataLoader's dataset, batched with ``collate_fn``).

    selection: the modules whose parameters span the d columns (a featurizer's ``selection()``).
    """

    def __init__(self, model: nn.Module, task: Task, dataset: Any, selection: ModuleSelection, batch_size: int = 32,
                 collate_fn: Callable[[list], Any] | None = None, max_examples: int | None = None,
                 progress: bool = False) -> None:
        self.model, self.task, self.selection = unwrap_model(model), task, selection
        if sharding_of(self.model) is not None:
            raise ShardedModelError("GGNProducts differentiates the model's output twice with respect to whole parameters; "
                                    "an FSDP2-sharded model is not supported: use EKFAC (EKFACScorer) on sharded models")
        self.params = list(selection.parameters(self.model).values())
        self.sizes = [p.numel() for p in self.params]
        dataset = as_dataset(dataset.dataset if isinstance(dataset, DataLoader) else dataset)
        n = len(dataset) if max_examples is None else min(int(max_examples), len(dataset))
        if n < 1:
            raise ValueError("GGNProducts needs at least one training example")
        self.loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        self.n, self.progress, self.passes = n, progress, 0
        self.dtype = self.params[0].dtype

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """``G vectors``: ``[Q, d]`` -> ``[Q, d]`` (one pass over the data)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"GGNProducts takes vectors [Q, {self.dim}] (the selected parameters); got {tuple(vectors.shape)}")
        v = vectors.to(self.dtype)
        parts = [t.reshape(v.shape[0], *p.shape) for t, p in zip(v.split(self.sizes, dim=1), self.params)]
        total = torch.zeros_like(v)
        flags = [p.requires_grad for p in self.model.parameters()]
        chosen = {id(p) for p in self.params}
        was_training, cast = self.model.training, caster(self.model)
        self.model.eval()
        try:
            for p in self.model.parameters():
                p.requires_grad_(id(p) in chosen)
            with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no double backward
                for batch in tqdm(self.loader, desc="GGN product", unit="batch", disable=not self.progress):
                    total += self._batch_product(tree_map(cast, batch), parts)
        finally:
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)
            self.model.train(was_training)
        self.passes += 1
        return total / self.n

    def _batch_product(self, batch: Any, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ over the batch's examples of J_iᵀ H_i J_i v, for every v: ``[Q, d]``."""
        captured: list[torch.Tensor] = []
        hook = self.model.register_forward_hook(lambda _m, _a, out: captured.append(logits_of(out)))
        try:
            loss = self.task.train_loss(self.model, batch)
        finally:
            hook.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the Task's train_loss ran the model {len(captured)} times on one batch; GGN products need "
                               "exactly one forward whose output the loss reads")
        z = captured[0]
        if not z.requires_grad:
            raise RuntimeError("the model's output does not depend on the selected parameters")
        grad_z = torch.autograd.grad(loss, z, create_graph=True)[0]
        w = torch.zeros_like(z, requires_grad=True)
        jt_w = torch.autograd.grad(z, self.params, grad_outputs=w, create_graph=True, allow_unused=True)
        used = [(g, v) for g, v in zip(jt_w, parts) if g is not None]
        jv = torch.autograd.grad([g for g, _ in used], w, grad_outputs=[v for _, v in used], is_grads_batched=True,
                                 retain_graph=True)[0]
        hjv = torch.autograd.grad(grad_z, z, grad_outputs=jv, is_grads_batched=True, retain_graph=True)[0]
        out = torch.autograd.grad(z, self.params, grad_outputs=hjv.detach(), is_grads_batched=True, allow_unused=True)
        q = parts[0].shape[0]
        return torch.cat([(g if g is not None else torch.zeros(q, *p.shape, dtype=self.dtype, device=p.device)).reshape(q, -1)
                          for g, p in zip(out, self.params)], dim=1)

"""transformers' ``Conv1D`` (GPT-2 and relatives): ``y = x W + b`` with W stored ``[d_in, d_out]``.

Recognised by name and shape (``type(m).__name__ == "Conv1D"`` with ``nx``, ``nf`` and a
``[nx, nf]`` weight), so transformers is never imported. ``G_i = Σ_t x_t g_tᵀ`` as stored, the
bias an extra row.
"""
from __future__ import annotations

import torch
from torch import nn

from sketchattr.core.kronecker import DenseFactor
from sketchattr.core.layout import KronLayout
from sketchattr.featurize.rules.base import KroneckerRule, positions


class HFConv1DRule(KroneckerRule, name="hf_conv1d"):
    """transformers.pytorch_utils.Conv1D (a Linear with the weight transposed)."""

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return (
            type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and tuple(w.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
        )

    def layout(self) -> KronLayout:
        nx, nf = self.module.weight.shape
        return KronLayout(nx, nf, "row" if getattr(self.module, "bias", None) is not None else None)

    def save(self, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return inputs[0].detach()

    def factors(self, saved: torch.Tensor, g: torch.Tensor) -> tuple[DenseFactor, DenseFactor]:
        return DenseFactor(positions(saved)), DenseFactor(positions(g))

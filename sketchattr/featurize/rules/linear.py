"""nn.Linear: ``y = x Wᵀ + b``, W ``[d_out, d_in]``; ``G_i = Σ_t g_t x_tᵀ`` (bias column)."""
from __future__ import annotations

import torch
from torch import nn

from sketchattr.core.kronecker import DenseFactor
from sketchattr.core.layout import KronLayout
from sketchattr.featurize.rules.base import KroneckerRule, positions


class LinearRule(KroneckerRule, name="linear"):
    """Any ``nn.Linear`` (inputs ``[B, d_in]`` or ``[B, T…, d_in]``)."""

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def layout(self) -> KronLayout:
        out_f, in_f = self.module.weight.shape
        return KronLayout(out_f, in_f, "col" if self.module.bias is not None else None)

    def save(self, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return inputs[0].detach()

    def factors(self, saved: torch.Tensor, g: torch.Tensor) -> tuple[DenseFactor, DenseFactor]:
        return DenseFactor(positions(g)), DenseFactor(positions(saved))

"""nn.Conv1d / nn.Conv2d through unfolded patches: ``G_i = Σ_p g_p patch_pᵀ`` over output positions p.

W ``[C_out, C_in, k…]`` is viewed as ``[C_out, C_in·Πk]`` (the ``unfold`` patch order), bias a
column. Supported: ``groups=1``, zero padding (symmetric ``"same"``). Positions are pixels, so a
Task's token mask does not apply.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sketchattr.core.kronecker import DenseFactor
from sketchattr.core.layout import KronLayout
from sketchattr.featurize.rules.base import KroneckerRule


class ConvRule(KroneckerRule, name="conv"):
    """nn.Conv1d and nn.Conv2d."""

    sequence = False

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d))

    def problem(self) -> str:
        m = self.module
        if m.groups != 1:
            return f"{type(m).__name__} with groups={m.groups}"
        if m.padding_mode != "zeros":
            return f"{type(m).__name__} with padding_mode={m.padding_mode!r}"
        if m.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size)):
            return f"{type(m).__name__} with asymmetric 'same' padding"
        return ""

    def layout(self) -> KronLayout:
        w = self.module.weight
        return KronLayout(w.shape[0], w[0].numel(), "col" if self.module.bias is not None else None)

    def _padding(self) -> tuple[int, ...]:
        m = self.module
        if m.padding == "valid":
            return (0,) * len(m.kernel_size)
        if m.padding == "same":
            return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size))
        return tuple(m.padding)

    def save(self, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return inputs[0].detach()

    def factors(self, saved: torch.Tensor, g: torch.Tensor) -> tuple[DenseFactor, DenseFactor]:
        m, x = self.module, saved
        two_d = isinstance(m, nn.Conv2d)
        spatial = 2 if two_d else 1
        if x.dim() == spatial + 1:  # unbatched call
            x, g = x.unsqueeze(0), g.unsqueeze(0)
        if two_d:
            patches = F.unfold(x, m.kernel_size, m.dilation, self._padding(), m.stride)
        else:  # a 1-D convolution is a 2-D one of height 1
            patches = F.unfold(x.unsqueeze(2), (1, m.kernel_size[0]), (1, m.dilation[0]),
                               (0, self._padding()[0]), (1, m.stride[0]))
        return DenseFactor(g.flatten(2).transpose(1, 2)), DenseFactor(patches.transpose(1, 2))

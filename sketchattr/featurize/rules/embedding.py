"""nn.Embedding: ``y_t = W[x_t]``, W ``[vocab, dim]``; ``G_i = Σ_t e_{x_t} g_tᵀ`` (one-hot rows).

Positions holding ``padding_idx`` get no gradient (as in torch). ``max_norm`` (renormalises W
in the forward) and ``scale_grad_by_freq`` (a batch-dependent gradient) are unsupported.
"""
from __future__ import annotations

import torch
from torch import nn

from sketchattr.core.kronecker import DenseFactor, OneHotFactor
from sketchattr.core.layout import KronLayout
from sketchattr.featurize.rules.base import KroneckerRule, positions


class EmbeddingRule(KroneckerRule, name="embedding"):
    """nn.Embedding (token ids ``[B]`` or ``[B, T…]``)."""

    one_hot_rows = True

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def problem(self) -> str:
        if self.module.max_norm is not None:
            return "Embedding with max_norm"
        if self.module.scale_grad_by_freq:
            return "Embedding with scale_grad_by_freq"
        return ""

    def layout(self) -> KronLayout:
        return KronLayout(*self.module.weight.shape, None)

    def save(self, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return inputs[0].detach()

    def factors(self, saved: torch.Tensor, g: torch.Tensor) -> tuple[OneHotFactor, DenseFactor]:
        g = positions(g)
        index = saved.reshape(g.shape[0], -1)
        pad = self.module.padding_idx
        weight = None if pad is None else (index != pad).to(g.dtype)
        return OneHotFactor(index, self.module.num_embeddings, weight, g.dtype), DenseFactor(g)

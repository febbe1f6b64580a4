"""Affine norms: ``y = x̂ ⊙ w + b`` with ``x̂`` the normalised input.

Per example: ``∂w = Σ_positions g ⊙ x̂`` and ``∂b = Σ_positions g``. ``x̂`` is the module's own
output with ``w = 1`` and ``b = 0`` (``torch.func.functional_call``), so any normalisation works
as long as the affine part is elementwise; the first call checks ``y == x̂ ⊙ w + b`` and refuses
a module for which it does not hold (e.g. Gemma's ``x̂ ⊙ (1 + w)``). Not Kronecker: curvature is
diagonal and factorized sketches project the (small) exact gradient.

* :class:`ElementwiseNormRule` — weight on the trailing dims: LayerNorm, RMSNorm, and any
  module named ``*RMSNorm`` / ``*LayerNorm`` whose parameters are ``weight`` (and ``bias``),
  e.g. ``LlamaRMSNorm``, ``T5LayerNorm``.
* :class:`ChannelNormRule` — weight per channel (dim 1): BatchNorm in eval mode (running
  statistics; in training mode the examples of a batch interact), GroupNorm, InstanceNorm.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from sketchattr.featurize.rules.base import LayerRule, UnsupportedModuleError

_ELEMENTWISE = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_NAME_ENDINGS = ("RMSNorm", "LayerNorm")
_BATCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CHANNEL = _BATCH + (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _affine_params(module: nn.Module) -> bool:
    """The module's own parameters are exactly ``weight`` (and a same-shaped ``bias``)."""
    own = dict(module.named_parameters(recurse=False))
    w = own.get("weight")
    if w is None or set(own) - {"weight", "bias"}:
        return False
    return "bias" not in own or own["bias"].shape == w.shape


class _AffineNormRule(LayerRule):
    """Shared body: x̂ by a unit-affine call, the affine check, gradients summed over positions."""

    channel_first: ClassVar[bool] = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._checked = False

    def save(self, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        own = dict(self.module.named_parameters(recurse=False))
        unit = {"weight": torch.ones_like(own["weight"])}
        if "bias" in own:
            unit["bias"] = torch.zeros_like(own["bias"])
        with torch.no_grad():
            xhat = functional_call(self.module, unit, tuple(i.detach() if torch.is_tensor(i) else i for i in inputs))
            if not self._checked:
                self._check(xhat, own, output.detach())
        return xhat

    def _check(self, xhat: torch.Tensor, own: dict, output: torch.Tensor) -> None:
        w, b = self._broadcast(own["weight"], xhat), self._broadcast(own.get("bias"), xhat)
        expect = xhat * w + (b if b is not None else 0)
        tol = 1e-2 if output.dtype in (torch.float16, torch.bfloat16) else 1e-5
        scale = float(output.abs().max().clamp(min=1)) if output.numel() else 1.0
        if not torch.allclose(expect.to(output.dtype), output, rtol=tol, atol=tol * scale):
            raise UnsupportedModuleError(
                f"{type(self.module).__name__} is not an affine norm (its output is not normalised(x) * weight + bias); "
                "it has no layer rule"
            )
        self._checked = True

    def _broadcast(self, p: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if p is None or not self.channel_first:
            return p
        return p.reshape(1, -1, *([1] * (like.dim() - 2)))

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, …]`` -> ``[B, positions, numel(weight)]``."""
        d = self.module.weight.numel()
        if self.channel_first:
            return t.reshape(t.shape[0], d, -1).transpose(1, 2)
        return t.reshape(t.shape[0], -1, d)

    def grads(self, saved: torch.Tensor, g: torch.Tensor, params: frozenset[str]) -> dict[str, torch.Tensor]:
        g2 = self._per_channel(g)
        out = {}
        if "weight" in params:
            out["weight"] = (g2 * self._per_channel(saved).to(g2.dtype)).sum(dim=1)
        if "bias" in params:
            out["bias"] = g2.sum(dim=1)
        return out


class ElementwiseNormRule(_AffineNormRule, name="elementwise_norm"):
    """LayerNorm / RMSNorm-style: weight and bias over the trailing dims."""

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        named = isinstance(module, _ELEMENTWISE) or type(module).__name__.endswith(_NAME_ENDINGS)
        return named and _affine_params(module)


class ChannelNormRule(_AffineNormRule, name="channel_norm"):
    """BatchNorm (eval mode), GroupNorm, InstanceNorm: weight and bias per channel (dim 1)."""

    channel_first = True
    sequence = False

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, _CHANNEL) and _affine_params(module)

    def problem(self) -> str:
        if isinstance(self.module, _BATCH) and self.module.training:
            return f"{type(self.module).__name__} in training mode (batch statistics couple the examples)"
        return ""

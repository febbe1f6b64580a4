"""Layer rules: how the hook engine differentiates one layer type exactly, per example.

A rule is bound to one module. During a forward pass the engine's hook calls :meth:`save` with
the module's inputs and output (keep what the gradient needs, detached); after the backward
pass it has ``g``, the gradient of the summed loss w.r.t. the module's output (its per-example
slices are exact: example i's loss reaches only row i). From ``(saved, g)`` the rule gives

* :meth:`LayerRule.grads` — the exact per-example gradient of each of its parameters,
  ``{local name: [B, numel]}``;
* :meth:`KroneckerRule.factors` — for Kronecker-structured layers, row and column
  :class:`~sketchattr.core.kronecker.Factor` s with ``G_i = Σ_t row_t col_tᵀ`` for the
  weight as stored (:meth:`KroneckerRule.layout`). Factorized sketches and EKFAC/KFAC statistics
  use these; rules without them get diagonal curvature and a dense sketch of their gradient.

Rules register by subclassing (``class MyRule(LayerRule, name="my")``) and claim modules with
:meth:`LayerRule.matches`; :func:`rule_for` picks the first match in registration order.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from sketchattr.core.kronecker import DenseFactor, Factor, outer_sum
from sketchattr.core.layout import KronLayout
from sketchattr.core.registry import Registered

__all__ = ["KroneckerRule", "LayerRule", "UnsupportedModuleError", "rule_for"]


class UnsupportedModuleError(ValueError):
    """A selected module has no layer rule for what was asked (or its configuration is unsupported)."""


class LayerRule(Registered, abc.ABC):
    """Exact per-example gradients of one module type from its inputs and output gradient.

    ``sequence``: the module's output is ``[B, T, ...]`` with token positions on dim 1 (a
    Task's mask then applies); False for convolutions, whose positions are pixels.
    """

    name: ClassVar[str] = "abstract"
    registry: ClassVar[dict[str, type["LayerRule"]]] = {}
    kind: ClassVar[str] = "layer rule"
    sequence: ClassVar[bool] = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @classmethod
    @abc.abstractmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this rule is for ``module``'s type."""

    def problem(self) -> str:
        """Why this module's configuration is unsupported ("" if it is supported)."""
        return ""

    @abc.abstractmethod
    def save(self, inputs: tuple, output: torch.Tensor) -> Any:
        """What the gradient needs from the forward call (detached tensors)."""

    @abc.abstractmethod
    def grads(self, saved: Any, g: torch.Tensor, params: frozenset[str]) -> dict[str, torch.Tensor]:
        """Per-example gradients ``{name: [B, numel]}`` of the module's parameters ``params``."""

    def layout(self) -> KronLayout | None:
        """The weight's matrix view (Kronecker rules), None otherwise."""
        return None


class KroneckerRule(LayerRule):
    """A rule whose weight gradient is ``Σ_t row_t col_tᵀ`` (bias: an extra column or row).

    ``one_hot_rows``: the row factor is one-hot (Embedding), so its second moment is diagonal.
    """

    one_hot_rows: ClassVar[bool] = False

    @abc.abstractmethod
    def factors(self, saved: Any, g: torch.Tensor) -> tuple[Factor, Factor]:
        """``(row [B, T, rows], col [B, T, cols])`` without the bias coordinate."""

    @abc.abstractmethod
    def layout(self) -> KronLayout:
        """rows, cols of the stored weight and the bias side ("col"/"row", None without a bias)."""

    def grads(self, saved: Any, g: torch.Tensor, params: frozenset[str]) -> dict[str, torch.Tensor]:
        row, col = self.factors(saved, g)
        out = {}
        if "weight" in params:
            out["weight"] = outer_sum(row, col).reshape(row.batch, -1)
        if "bias" in params:  # the bias coordinate is a constant 1 on one side: Σ_t of the other side
            other = row if self.layout().bias == "col" else col
            if not isinstance(other, DenseFactor):
                raise UnsupportedModuleError(f"{type(self.module).__name__}: a bias beside one-hot factors")
            out["bias"] = other.values.sum(dim=1)
        return out


def rule_for(module: nn.Module) -> LayerRule | None:
    """A bound rule for ``module`` (first registered rule that matches), or None."""
    for cls in LayerRule.registry.values():
        if cls.matches(module):
            return cls(module)
    return None


def positions(t: torch.Tensor) -> torch.Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]`` (T = product of the middle dims; 1 for ``[B, d]``)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])

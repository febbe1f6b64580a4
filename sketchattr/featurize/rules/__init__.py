"""Layer rules of the hook engine: one class per layer type (see :mod:`.base`).

Registered, in matching order: ``linear`` (nn.Linear), ``hf_conv1d`` (transformers' Conv1D),
``conv`` (nn.Conv1d/Conv2d), ``embedding`` (nn.Embedding), ``elementwise_norm`` (LayerNorm,
RMSNorm and any weight/bias elementwise norm), ``channel_norm`` (BatchNorm in eval mode,
GroupNorm, InstanceNorm). A rule gives exact per-example gradients from a module's inputs and
output gradient, and Kronecker factors (:mod:`sketchattr.core.kronecker`) where the layer has them.

May import :mod:`sketchattr.core` only.
"""
from sketchattr.core.kronecker import DenseFactor, Factor, OneHotFactor, outer_sum
from sketchattr.core.layout import BlockLayout, FlatLayout, KronLayout, layout_from
from sketchattr.featurize.rules.base import (
    KroneckerRule,
    LayerRule,
    UnsupportedModuleError,
    rule_for,
)
from sketchattr.featurize.rules.conv import ConvRule
from sketchattr.featurize.rules.conv1d_hf import HFConv1DRule
from sketchattr.featurize.rules.embedding import EmbeddingRule
from sketchattr.featurize.rules.linear import LinearRule
from sketchattr.featurize.rules.norm import ChannelNormRule, ElementwiseNormRule

__all__ = [
    "BlockLayout", "ChannelNormRule", "ConvRule", "DenseFactor", "ElementwiseNormRule", "EmbeddingRule", "Factor",
    "FlatLayout", "HFConv1DRule", "KronLayout", "KroneckerRule", "LayerRule", "LinearRule",
    "OneHotFactor", "UnsupportedModuleError", "layout_from", "outer_sum", "rule_for",
]

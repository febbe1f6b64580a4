"""A small ResNet-9 (the DAWNBench CIFAR-10 layout of Page / Kronfluence's CIFAR ResNet-9), width-scaled.

Layout with base width w (channels w, 2w, 4w, 8w)::

    prep   conv3x3(c_in, w)  - BN - ReLU
    layer1 conv3x3(w, 2w)    - BN - ReLU - MaxPool2 - Residual(2 × conv-BN-ReLU at 2w)
    layer2 conv3x3(2w, 4w)   - BN - ReLU - MaxPool2
    layer3 conv3x3(4w, 8w)   - BN - ReLU - MaxPool2 - Residual(2 × conv-BN-ReLU at 8w)
    head   global max-pool - Flatten - Linear(8w, num_classes, bias=False) - × scale (0.125)

Works for 32×32 and 28×28 inputs (global max-pool). No in-place ops, so per-example gradients with
``torch.func.vmap`` over ``functional_call`` work in eval mode (BatchNorm uses its running stats).
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3 (no bias) - BatchNorm - ReLU; [B, c_in, H, W] -> [B, c_out, H, W]."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class GlobalMaxPool(nn.Module):
    """[B, C, H, W] -> [B, C] (max over space)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1))


class Scale(nn.Module):
    """Multiply by a constant (the 0.125 logit scale of the DAWNBench net)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class ResNet9(nn.Sequential):
    """ResNet-9: images [B, in_channels, H, W] (H, W >= 8) -> logits [B, num_classes].

    Submodules: ``prep``, ``layer1``, ``layer2``, ``layer3``, ``pool``, ``flatten``, ``fc``, ``scale``.
    ``width=16`` gives ~0.4M parameters (the original uses 64, ~6.6M).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, scale: float = 0.125) -> None:
        w = int(width)
        super().__init__()
        self.prep = conv_bn(in_channels, w)
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w)))
        self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(conv_bn(8 * w, 8 * w), conv_bn(8 * w, 8 * w)))
        self.pool = GlobalMaxPool()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = Scale(scale)


def make_resnet9(num_classes: int = 10, in_channels: int = 3, width: int = 16, seed: int = 0) -> ResNet9:
    """``ResNet9`` built after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return ResNet9(num_classes=num_classes, in_channels=in_channels, width=width)

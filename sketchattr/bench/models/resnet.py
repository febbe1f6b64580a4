"""Bottleneck ResNets with torchvision's layout: ResNet-50 and tiny variants for tests.

:class:`ResNet` reproduces ``torchvision.models.resnet.ResNet`` with ``Bottleneck`` blocks
(v1.5: the stride sits on the 3×3 conv), module for module, so the state-dict keys
(``conv1.weight``, ``layer1.0.downsample.1.running_var``, ``fc.bias``, ...) and shapes are
torchvision's and its ResNet-50 weights load with ``load_state_dict``. Base width and blocks
per stage are configurable: ``ResNet((3, 4, 6, 3), width=64)`` is ResNet-50 (25,557,032
parameters with 1000 classes); ``tiny_resnet()`` (width 4, one block per stage, ~33K
parameters) is the same network in miniature for tests.

:func:`resnet50` returns torchvision's model when torchvision imports and this one otherwise
(same keys either way). Nothing is ever downloaded: weights come from a local file via
:func:`load_weights` (``torch.load(..., weights_only=True)``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

EXPANSION = 4  # Bottleneck output channels = 4 × the block's width


class Bottleneck(nn.Module):
    """1×1 reduce - 3×3 (stride) - 1×1 expand, each with BatchNorm; ReLU after the residual add.

    [B, in_channels, H, W] -> [B, 4·width, H/stride, W/stride].
    """

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet: images [B, in_channels, H, W] -> logits [B, num_classes].

    layers: blocks per stage (ResNet-50: (3, 4, 6, 3)). width: the first stage's bottleneck
    width (64 for ResNet-50); stage k uses width·2^k and outputs 4·width·2^k channels.
    Initialisation follows torchvision (Kaiming-normal convs, BatchNorm weight 1 / bias 0).
    """

    def __init__(
        self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000, width: int = 64, in_channels: int = 3
    ) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must give 4 stages of >= 1 blocks, got {tuple(layers)}")
        if width < 1 or num_classes < 1:
            raise ValueError(f"width and num_classes must be >= 1, got width={width}, num_classes={num_classes}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * EXPANSION, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * EXPANSION:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, width * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(width * EXPANSION),
            )
        out = [Bottleneck(self.inplanes, width, stride, downsample)]
        self.inplanes = width * EXPANSION
        out += [Bottleneck(self.inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000, use_torchvision: bool | None = None) -> nn.Module:
    """ResNet-50 with random weights: torchvision's when it imports (``use_torchvision=None``),
    else :class:`ResNet`; the two have the same state-dict keys and shapes."""
    if use_torchvision is not False:
        try:
            from torchvision.models import resnet50 as tv_resnet50
        except ImportError:
            if use_torchvision:
                raise
        else:
            return tv_resnet50(weights=None, num_classes=num_classes)
    return ResNet((3, 4, 6, 3), num_classes=num_classes, width=64)


def tiny_resnet(num_classes: int = 10, width: int = 4, layers: Sequence[int] = (1, 1, 1, 1)) -> ResNet:
    """A ResNet-50-shaped toy (same module names per block) for tests: width 4, one block per
    stage; 3 classes ≈ 33K parameters."""
    return ResNet(layers, num_classes=num_classes, width=width)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped keys)."""


def load_weights(model: nn.Module, path: "str | os.PathLike[str]") -> nn.Module:
    """Load a local state dict into ``model`` (``torch.load(weights_only=True)``), in place.

    Accepts a plain state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``;
    a DDP ``module.`` prefix is stripped. Raises FileNotFoundError for a missing file and
    :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = _unwrap_state(state, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{what} ({len(keys)}): {_preview(keys)}" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}:\n  " + "\n  ".join(parts))
    model.load_state_dict(state)
    return model


def _unwrap_state(state: Any, path: "str | os.PathLike[str]") -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _preview(keys: Sequence[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def checkpoint_num_classes(path: "str | os.PathLike[str]") -> int | None:
    """Output size of the ``fc`` layer stored in a checkpoint (None when it has no ``fc.weight``)."""
    state = _unwrap_state(torch.load(path, map_location="cpu", weights_only=True), path)
    w = state.get("fc.weight")
    return None if w is None else int(w.shape[0])

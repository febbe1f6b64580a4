"""Multinomial logistic regression: ``Flatten -> Linear(in_features, num_classes)``."""
from __future__ import annotations

import torch
from torch import nn


def make_logistic(in_features: int, num_classes: int, seed: int = 0) -> nn.Sequential:
    """Input [N, *shape] (prod(shape) == in_features) -> logits [N, num_classes]. Modules: "0" Flatten, "1" Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(int(in_features), int(num_classes)))

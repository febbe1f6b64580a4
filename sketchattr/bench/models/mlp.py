"""Small MLPs. The digits bench model is ``make_mlp()``: Linear(64,128) -> ReLU -> Linear(128,10), 9,610 params."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def make_mlp(in_dim: int = 64, hidden: int | Sequence[int] = 128, out_dim: int = 10, seed: int = 0) -> nn.Sequential:
    """Build ``Linear -> ReLU -> ... -> Linear`` after ``torch.manual_seed(seed)``.

    ``hidden`` is one width or a list of widths (``[]`` gives a linear model). Modules are
    named "0", "1", "2", ... (plain ``nn.Sequential``). Input [N, in_dim] -> logits [N, out_dim].
    """
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = in_dim
    for w in widths:
        layers += [nn.Linear(d, int(w)), nn.ReLU()]
        d = int(w)
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)

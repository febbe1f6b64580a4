import pytest
import torch
from torch import nn


def tiny_mlp(seed: int = 0, d_in: int = 5, hidden: int = 7, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()


def tiny_data(n: int = 24, d_in: int = 5, d_out: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, d_out, (n,), generator=g)
    return x, y


@pytest.fixture
def mlp():
    return tiny_mlp()


@pytest.fixture
def data():
    return tiny_data()

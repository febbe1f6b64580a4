import pytest
import torch
from torch import nn

from sketchattr.featurize.selection import select_modules


class Reordered(nn.Module):
    """Registration order differs from forward order: head registered first."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.body = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def test_all_and_counts(mlp):
    sel = select_modules(mlp)
    assert sel.names == ("0", "2")
    assert sel.dims == (5 * 7 + 7, 7 * 3 + 3)
    assert sel.total == sum(p.numel() for p in mlp.parameters())
    assert "total" in sel.summary() and "66" in sel.summary()


def test_last_n_follows_forward_order():
    model = Reordered()
    assert select_modules(model, 1).names == ("norm",)  # no example input: registration order
    traced = select_modules(model, 2, example_input=torch.randn(1, 3))
    assert traced.names == ("norm", "head")
    assert traced.param_names == (("norm.weight", "norm.bias"), ("head.weight", "head.bias"))


def test_explicit_names_and_unknown(mlp):
    assert select_modules(mlp, ["2"]).names == ("2",)
    with pytest.raises(ValueError, match=r"available: \['0', '2'\]"):
        select_modules(mlp, ["nope"])
    with pytest.raises(ValueError):
        select_modules(mlp, 3)
    with pytest.raises(ValueError):
        select_modules(mlp, "last")

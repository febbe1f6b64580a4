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


def saved_checkpoints(tmp_path, scorer: str) -> tuple:
    """Two make_mlp checkpoints, a train file (30 rows) and a test file (4 rows) on disk, and the
    ``sketchattr tracin --scorer <scorer>`` arguments that read them: (x, y, models, argv)."""
    from sketchattr.bench.models.mlp import make_mlp

    x, y = tiny_data(n=30)
    torch.save({"x": x.float(), "y": y}, tmp_path / "train.pt")
    torch.save({"x": x[:4].float(), "y": y[:4]}, tmp_path / "test.pt")
    models = [make_mlp(in_dim=5, hidden=7, out_dim=3, seed=s) for s in range(2)]
    cks = []
    for s, model in enumerate(models):
        cks.append(str(tmp_path / f"ck{s}.pt"))
        torch.save(model.state_dict(), cks[-1])
    argv = ["tracin", "--model-def", "sketchattr.bench.models.mlp:make_mlp", "--model-kwargs", '{"in_dim": 5, "hidden": 7, "out_dim": 3}',
            "--checkpoints", *cks, "--train-data", str(tmp_path / "train.pt"), "--test-data", str(tmp_path / "test.pt"),
            "--top-k", "3", "--output", str(tmp_path / "out.json"), "--device", "cpu", "--no-progress", "--scorer", scorer]
    return x, y, models, argv

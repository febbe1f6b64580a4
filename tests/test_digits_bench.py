import numpy as np
import torch
from torch.nn import functional as F

from sketchattr.bench.data import load_digits_split
from sketchattr.bench.models import make_mlp
from sketchattr.bench.recipes import margin, train_classifier, train_digits_mlp


def test_split_shapes_dtypes_and_rule():
    s = load_digits_split()
    assert s.x_train.shape == (1000, 64) and s.x_train.dtype == torch.float32
    assert s.y_train.shape == (1000,) and s.y_train.dtype == torch.int64
    assert s.x_query.shape == (100, 64) and s.x_query.dtype == torch.float32
    assert s.y_query.shape == (100,) and s.y_query.dtype == torch.int64
    perm = np.random.RandomState(0).permutation(1797)
    np.testing.assert_array_equal(s.train_index, perm[:1000])
    np.testing.assert_array_equal(s.query_index, perm[1000:1100])
    assert not set(s.train_index) & set(s.query_index)
    from sklearn.datasets import load_digits

    d = load_digits()
    np.testing.assert_allclose(s.x_train.numpy(), d.data[perm[:1000]] / 16, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(s.y_query.numpy(), d.target[perm[1000:1100]])
    assert float(s.x_train.max()) <= 1.0 and float(s.x_train.min()) >= 0.0
    x, y = s.train_dataset()[3]
    assert torch.equal(x, s.x_train[3]) and len(s.query_dataset()) == 100


def test_model_params_and_seed_determinism():
    m = make_mlp()
    assert sum(p.numel() for p in m.parameters()) == 9610
    assert [n for n, _ in m.named_children()] == ["0", "1", "2"]
    a, b, c = make_mlp(seed=0), make_mlp(seed=0), make_mlp(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)
    deep = make_mlp(hidden=[32, 16])
    assert deep(torch.zeros(2, 64)).shape == (2, 10) and len(deep) == 5


def test_recipe_deterministic():
    sub = np.arange(0, 1000, 5)
    a = train_digits_mlp(sub, seed=3)
    b = train_digits_mlp(sub, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_short_training_reduces_loss():
    s = load_digits_split()
    m = make_mlp(seed=0)
    with torch.no_grad():
        before = F.cross_entropy(m(s.x_train), s.y_train).item()
    train_classifier(m, s.x_train, s.y_train, epochs=3)
    with torch.no_grad():
        after = F.cross_entropy(m(s.x_train), s.y_train).item()
    assert after < 0.5 * before


def test_margin():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 3.0]])
    y = torch.tensor([0, 2])
    expect = torch.tensor([2.0 - np.logaddexp(0.0, 1.0), 3.0 - np.logaddexp(0.0, 3.0)])
    torch.testing.assert_close(margin(logits, y), expect.float())

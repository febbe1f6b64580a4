import torch

from sketchattr.score.linalg import accumulate_gram, eigh_ascending, symmetrize_upper


def test_blockwise_weighted_gram_equals_dense():
    g = torch.randn(57, 9, dtype=torch.float64)
    w = torch.rand(57, dtype=torch.float64) + 0.1
    acc = torch.zeros(9, 9, dtype=torch.float64)
    for s in range(0, 57, 10):
        accumulate_gram(acc, g[s : s + 10], w[s : s + 10])
    symmetrize_upper(acc)
    assert torch.allclose(acc, (g * w[:, None]).T @ g, atol=1e-12)
    acc32 = torch.zeros(9, 9)
    accumulate_gram(acc32, g.float())
    symmetrize_upper(acc32)
    assert torch.allclose(acc32.double(), g.T @ g, rtol=1e-5, atol=1e-4)


def test_eigh_ascending_reconstructs():
    a = torch.randn(12, 12, dtype=torch.float64)
    a = a @ a.T
    s, v = eigh_ascending(a.clone())
    assert (s[1:] >= s[:-1]).all()
    assert torch.allclose(v @ torch.diag(s) @ v.T, a, atol=1e-10)
    assert torch.allclose(s, torch.linalg.eigvalsh(a), atol=1e-10)

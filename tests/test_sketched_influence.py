import numpy as np
import pytest
import torch

from dense_reference import ce_loss, dense_influence, margin_fn, per_example_grads
from sketchattr import ClassificationTask, Featurizer, SketchedInfluence
from sketchattr.score.damping import auto_damping, effective_dimension


def _grads(mlp, data):
    x, y = data
    return per_example_grads(mlp, ce_loss, x, y), per_example_grads(mlp, margin_fn, x[:6], y[:6])


def test_identity_projector_equals_dense_formula(mlp, data):
    x, y = data
    g, q = _grads(mlp, data)
    feat = Featurizer(mlp, ClassificationTask(), projector="identity", progress=False)
    store = feat.featurize((x, y))
    lam = 1e-2
    scorer = SketchedInfluence(damping=lam, method="eigen").fit(store)
    scores = scorer.score(feat.query_rows((x[:6], y[:6])))
    assert scores.shape == (6, len(x))
    assert torch.allclose(scores, dense_influence(q, g, lam), atol=1e-8, rtol=1e-8)


def test_gram_path_equals_eigen_path_and_dense(mlp, data):
    g, q = _grads(mlp, data)  # n = 24 < d = 66: the Gram path is the natural one
    eig = SketchedInfluence(damping=0.05, method="eigen").fit(g)
    gram = SketchedInfluence(damping=0.05).fit(g)
    assert gram.path == "gram"
    ref = dense_influence(q, g, 0.05)
    assert torch.allclose(gram.score(q), ref, atol=1e-9)
    assert torch.allclose(eig.score(q), ref, atol=1e-9)
    assert torch.allclose(gram.self_influence(), eig.self_influence(), atol=1e-9)
    assert torch.allclose(gram.precondition(q), eig.precondition(q), atol=1e-8)
    assert abs(gram.effective_dimension() - eig.effective_dimension()) < 1e-9


def test_lambda_grid_equals_separate_solves(mlp, data):
    g, q = _grads(mlp, data)
    lams = [1e-3, 1e-2, 1e-1, 1.0]
    for method in ("eigen", "gram"):
        scorer = SketchedInfluence(method=method).fit(g)
        grid = scorer.score_grid(q, lams)
        for k, lam in enumerate(lams):
            assert torch.allclose(grid[k], dense_influence(q, g, lam), atol=1e-8)


def test_self_influence_and_effective_dimension(mlp, data):
    g, _ = _grads(mlp, data)
    lam = 0.03
    scorer = SketchedInfluence(damping=lam).fit(g)
    d = g.shape[1]
    f = g.T @ g / g.shape[0]
    inv = torch.linalg.inv(f + lam * torch.eye(d, dtype=g.dtype))
    expect = torch.einsum("id,de,ie->i", g, inv, g)
    assert torch.allclose(scorer.self_influence(), expect, atol=1e-8)
    assert (scorer.self_influence() > 0).all()
    assert abs(scorer.effective_dimension() - float(torch.trace(f @ inv))) < 1e-8
    # self-influence is the diagonal of pairwise scores of train rows against themselves (sign flipped)
    assert torch.allclose(-scorer.score(g).diagonal(), scorer.self_influence(), atol=1e-8)


def test_duplicate_of_query_is_a_top_proponent():
    """Each query is itself a training row: its duplicate should rank among its top proponents."""
    from torch import nn
    torch.manual_seed(0)
    x = torch.randn(60, 4, dtype=torch.float64)
    y = (x @ torch.randn(4, 3, dtype=torch.float64) + torch.randn(60, 3, dtype=torch.float64)).argmax(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for projector, m, k, need in (("identity", None, 3, 17), ("gaussian", 64, 5, 15)):
        feat = Featurizer(model, ClassificationTask(), projector=projector, m=m, seed=0, progress=False)
        scorer = SketchedInfluence().fit(feat.featurize((x, y)))
        top = scorer.top_k(feat.query_rows((x[:20], y[:20])), k=k)
        hits = sum(q in top.proponents[q] for q in range(20))
        assert hits >= need, (projector, hits)
        assert (top.proponent_scores[:, 0] > 0).all() and (top.proponent_scores[:, 0] >= top.opponent_scores[:, 0]).all()


def test_top_k_carries_dataset_indices(mlp, data):
    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), projector="identity", progress=False)
    store = feat.featurize((x, y), indices=np.arange(4, 24))
    scorer = SketchedInfluence(damping=0.1).fit(store)
    q = feat.query_rows((x[:3], y[:3]))
    scores = scorer.score(q)
    top = scorer.top_k(q, k=4)
    order = torch.argsort(scores, dim=1, descending=True)[:, :4].numpy()
    assert (top.proponents == np.arange(4, 24)[order]).all()
    assert top.proponents.min() >= 4


def test_auto_damping_rule(mlp, data):
    g, _ = _grads(mlp, data)
    scorer = SketchedInfluence().fit(g)
    lam = scorer.damping_
    from sketchattr.score.damping import AUTO_RELATIVE_FLOOR
    assert lam >= AUTO_RELATIVE_FLOOR * scorer.sigma_max - 1e-15
    assert scorer.effective_dimension() <= g.shape[1] / 4 + 1e-6
    assert lam == auto_damping(scorer.sigma, g.shape[1])
    assert effective_dimension(scorer.sigma, lam) == pytest.approx(scorer.effective_dimension())


def test_bad_inputs(mlp, data):
    g, q = _grads(mlp, data)
    with pytest.raises(ValueError):
        SketchedInfluence(damping=-1.0)
    with pytest.raises(ValueError):
        SketchedInfluence(damping="big")
    with pytest.raises(RuntimeError, match="fit"):
        SketchedInfluence().score(q)
    scorer = SketchedInfluence().fit(g)
    with pytest.raises(ValueError, match="same projector"):
        scorer.score(q[:, :10])
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(q * float("nan"))
    with pytest.raises(ValueError):
        SketchedInfluence().fit(g[:0])


def test_streaming_top_k_and_hdf5_scores_match_full_matrix(tmp_path, mlp, data):
    import h5py
    g, q = _grads(mlp, data)
    scorer = SketchedInfluence(damping=0.02, method="eigen", block_rows=5).fit(g, indices=np.arange(100, 124))
    full = scorer.score(q)
    top = scorer.top_k(q, k=6)
    order = torch.argsort(full, dim=1, descending=True)[:, :6].numpy()
    assert (top.proponents == np.arange(100, 124)[order]).all()
    assert np.allclose(top.proponent_scores, np.take_along_axis(full.numpy(), order, 1))
    low = torch.argsort(full, dim=1)[:, :6].numpy()
    assert (top.opponents == np.arange(100, 124)[low]).all()
    top2 = scorer.score_to_hdf5(q, tmp_path / "scores.h5", k=6)
    with h5py.File(tmp_path / "scores.h5", "r") as f:
        assert np.allclose(f["scores"][:], full.numpy(), rtol=1e-6)
        assert (f["train_indices"][:] == np.arange(100, 124)).all()
    assert (top2.proponents == top.proponents).all()


def test_importance_weights_enter_the_fisher(mlp, data):
    from sketchattr.store import MemoryStore, StoreMetadata
    g, q = _grads(mlp, data)
    w = torch.linspace(0.5, 3.0, g.shape[0], dtype=torch.float64)
    store = MemoryStore()
    store.prepare(StoreMetadata(projector={}, modules={}, model_fingerprint="", task="", dim=g.shape[1]))
    store.write(np.arange(g.shape[0]), g, weights=w.numpy())
    lam = 0.05
    f = (g * w[:, None]).T @ g / w.sum()
    ref = -(torch.linalg.solve(f + lam * torch.eye(g.shape[1], dtype=g.dtype), q.T)).T @ g.T
    for method in ("eigen", "gram"):
        scorer = SketchedInfluence(damping=lam, method=method).fit(store)
        assert torch.allclose(scorer.score(q), ref, atol=1e-8), method

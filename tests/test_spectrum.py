import math

import numpy as np
import pytest
import torch

from dense_reference import ce_loss, margin_fn, per_example_grads
from sketchattr import SketchedInfluence, make_projector
from sketchattr.validate import (
    exact_effective_dimension,
    loo_correlation,
    loo_ground_truth,
    recommend_sketch_size,
    spectrum_check,
)
from sketchattr.validate.lds import lds
from sketchattr.validate.ground_truth import GroundTruth


def _setup(mlp, data):
    x, y = data
    return per_example_grads(mlp, ce_loss, x, y), per_example_grads(mlp, margin_fn, x[:8], y[:8])


def _dense_phi(g_train, a, b, lam):
    f = g_train.T @ g_train / g_train.shape[0]
    return a @ torch.linalg.solve(f + lam * torch.eye(f.shape[0], dtype=f.dtype), b.T)


def test_spectrum_check_equals_dense_sketched_formulas(mlp, data):
    g, q = _setup(mlp, data)
    dims = [42, 24]
    proj = make_projector("gaussian", m=30, seed=4)
    P = proj.matrix(dims)
    lam = 0.02
    exact = SketchedInfluence().fit(g)
    sketch = SketchedInfluence().fit(g @ P.T)
    check = spectrum_check(exact, q, sketch, q @ P.T, lam)
    phi = torch.diagonal(_dense_phi(g, q, q, lam))
    bs = _dense_phi(g @ P.T, q @ P.T, q @ P.T, lam)
    assert np.allclose(check.ratios, (torch.diagonal(bs) / phi).numpy(), rtol=1e-8)
    b = _dense_phi(g, q, q, lam)
    err = ((bs - b).abs() / torch.sqrt(phi[:, None] * phi[None, :]))[~torch.eye(8, dtype=torch.bool)]
    assert check.pairwise_epsilon_95 == pytest.approx(float(np.quantile(err.numpy(), 0.95)), rel=1e-8)
    assert check.epsilon_95 == pytest.approx(float(np.quantile(np.abs(check.ratios - 1), 0.95)))
    assert check.m == 30 and check.d_lambda == pytest.approx(exact_effective_dimension(g, lam), rel=1e-9)


def test_identity_sketch_is_exact_and_bigger_sketches_are_better(mlp, data):
    g, q = _setup(mlp, data)
    exact = SketchedInfluence().fit(g)
    same = spectrum_check(exact, q, SketchedInfluence().fit(g.clone()), q, 0.05)
    assert same.epsilon_95 < 1e-8 and same.pairwise_epsilon_95 < 1e-8
    eps = []
    for m in (8, 512):
        trials = []
        for seed in range(5):
            P = make_projector("sjlt", m=m, seed=seed).matrix([66])
            trials.append(spectrum_check(exact, q, SketchedInfluence().fit(g @ P.T), q @ P.T, 0.05).epsilon_95)
        eps.append(np.median(trials))
    assert eps[1] < eps[0]


def test_exact_effective_dimension_is_the_trace_formula(mlp, data):
    g, _ = _setup(mlp, data)
    lam = 0.1
    f = g.T @ g / g.shape[0]
    expect = float(torch.trace(f @ torch.linalg.inv(f + lam * torch.eye(66, dtype=f.dtype))))
    assert exact_effective_dimension(g, lam) == pytest.approx(expect, rel=1e-9)


def test_recommend_sketch_size():
    assert recommend_sketch_size(100, 0.1, 0.05, scale=0.4) == math.ceil(0.4**2 * (100 + math.log(20)) / 0.01)
    assert recommend_sketch_size(100, 0.05) > recommend_sketch_size(100, 0.1)
    with pytest.raises(ValueError):
        recommend_sketch_size(0, 0.1)
    with pytest.raises(ValueError):
        recommend_sketch_size(10, 1.5)


def test_lds_accepts_ground_truth_object():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 10)) < 0.5
    outputs = rng.normal(size=(6, 3))
    scores = rng.normal(size=(3, 10))
    gt = GroundTruth(masks=masks, outputs=outputs)
    assert lds(scores, gt).mean == lds(scores, masks, outputs).mean


def test_loo_ground_truth_and_correlation(tmp_path):
    n_train, n_query = 6, 2
    effect = np.arange(n_train * n_query, dtype=float).reshape(n_train, n_query)  # row i: effect of i

    def train_fn(pos, seed):
        return (np.asarray(pos), seed)

    def measure_fn(model):
        pos, seed = model
        return effect[pos].sum(0) + seed  # the seed shifts every run alike (common random numbers)

    truth = loo_ground_truth(tmp_path / "loo.h5", train_fn, measure_fn, n_train=n_train, removed=[1, 4, 5], n_seeds=3, progress=False)
    assert np.allclose(truth.delta, effect[[1, 4, 5]])
    scores = effect.T.copy()  # a perfect predictor
    mean, per_query = loo_correlation(scores, truth)
    assert mean == pytest.approx(1.0) and per_query.shape == (n_query,)
    again = loo_ground_truth(tmp_path / "loo.h5", train_fn, measure_fn, n_train=n_train, removed=[1, 4, 5], n_seeds=3, progress=False)
    assert np.array_equal(again.delta, truth.delta)
    with pytest.raises(ValueError):
        loo_ground_truth(tmp_path / "x.h5", train_fn, measure_fn, n_train=n_train, removed=[9], progress=False)

"""RefinedInfluence (EKFAC-preconditioned CG on the exact Gauss-Newton matrix) against the dense
formula, float64: G = (1/n) Σ JᵀHJ from jacrev with H written out, (G + λ)⁻¹ by torch.linalg.solve,
explicit per-example gradients by autograd; EKFAC's inverse built from its eigenbases."""
import json
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import sketchattr as sa
from conftest import tiny_data, tiny_mlp
from dense_reference import ce_loss, dense_ggn, dense_spectral_matrix, margin_fn, per_example_grads, softmax_hessian
from sketchattr.cli.main import main
from sketchattr.score.refined import RefinedInfluence
from test_cli_commands import QUIET, build_mlp, files  # noqa: F401  (files: the CLI tests' data, a fixture)


def setting():
    model, (x, y) = tiny_mlp(), tiny_data(n=20)
    task = sa.ClassificationTask()
    feat = sa.Featurizer(model, task, projector="identity", batch_size=8, progress=False)
    factors = sa.fit_factors(model, task, (x, y), kind="ekfac", batch_size=8, progress=False)
    sel = feat.selection().parameters(model)
    G = dense_ggn(model, list(sel), list(sel.values()), x, lambda call, xi: call(xi[None]), softmax_hessian)
    return model, feat, factors, (x, y), G, feat.featurize((x, y))


def test_converges_to_the_exact_damped_solve_and_starts_at_ekfac():
    model, feat, factors, train, G, store = setting()
    xq, yq = tiny_data(n=4, seed=5)
    q = per_example_grads(model, margin_fn, xq, yq)
    g = per_example_grads(model, ce_loss, *train)
    lam = 0.05
    refined = RefinedInfluence(factors, feat, train, damping=lam, iterations=80, tol=1e-11).fit(store)
    exact = -torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), q.T).T @ g.T
    assert torch.allclose(refined.score((xq, yq)), exact, rtol=1e-7, atol=1e-9)
    selfs = refined.self_influence(train, indices=[0, 1, 2])  # ⟨(G + λ)⁻¹ g_i, g_i⟩, also refined
    inv = torch.linalg.inv(G + lam * torch.eye(G.shape[0], dtype=torch.float64))
    assert torch.allclose(selfs, torch.einsum("id,de,ie->i", g[:3], inv, g[:3]), rtol=1e-7)
    before = refined.passes_
    refined.score((xq, yq))
    hist = refined.history_
    assert hist.residuals[-1] <= 1e-11 < hist.residuals[0] and hist.active[-1] == 0
    assert refined.passes_ - before == len(hist.residuals) < G.shape[0]  # the starting residual, then one per iteration (CG: ≤ d)
    # iteration 0 is EKFAC at the same damping, written out from its eigenbases
    M = dense_spectral_matrix(factors, feat.engine.blocks, lambda lam_: 1.0 / (lam_ + lam))
    ekfac = RefinedInfluence(factors, feat, train, damping=lam, iterations=0).fit(store).score((xq, yq))
    assert torch.allclose(ekfac, -(q @ M) @ g.T, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ekfac, sa.EKFACScorer(factors, feat, damping=lam).fit(store).score((xq, yq)), rtol=1e-10)
    # fewer iterations: the residual it stopped at is the one reported
    two = RefinedInfluence(factors, feat, train, damping=lam, iterations=2, tol=0.0)
    two.fit(store).score((xq, yq))
    assert len(two.history_.residuals) == 3 and two.passes_ == 3


@pytest.mark.parametrize("store_kind", ["gaussian", "sparse eigenbasis, every coordinate"])
def test_refined_queries_read_sketched_stores(store_kind):
    """The refined query (G + λ)⁻¹∇f, solved densely, scored through a Gaussian sketch written out as a
    matrix, or through a sparse-eigenbasis store that keeps every coordinate (then exactly)."""
    model, feat, factors, train, G, store = setting()
    xq, yq = tiny_data(n=3, seed=5)
    q = per_example_grads(model, margin_fn, xq, yq)
    g = per_example_grads(model, ce_loss, *train)
    lam, d = 0.05, G.shape[0]
    x = torch.linalg.solve(G + lam * torch.eye(d, dtype=torch.float64), q.T).T
    if store_kind == "gaussian":
        sketch = sa.Featurizer(model, sa.ClassificationTask(), projector="gaussian", m=16, seed=3, batch_size=8, progress=False)
        blocks = sketch.engine.blocks
        eye = torch.eye(d, dtype=torch.float64).split([b.dim for b in blocks], dim=1)
        P = sketch.projector.project(list(eye))  # [d, m]: the sketch as a matrix
        expected = -(x @ P) @ (g @ P).T
    else:
        sketch = sa.Featurizer(model, sa.ClassificationTask(), projector=sa.SparseEigenbasisProjector(2 * d, factors, damping=lam),
                               batch_size=8, progress=False)
        expected = -x @ g.T
    refined = RefinedInfluence(factors, sketch, train, damping=lam, iterations=80, tol=1e-11)
    got = refined.fit(sketch.featurize(train)).score((xq, yq))
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_auto_damping_is_ten_times_the_mean_eigenvalue_on_every_module():
    model, feat, factors, train, G, store = setting()
    lams = torch.cat([factors.tensors[b.name]["Lambda"].reshape(-1) for b in feat.engine.blocks])
    refined = RefinedInfluence(factors, feat, train)
    assert set(refined.damping_) == {b.name for b in feat.engine.blocks}
    assert all(v == pytest.approx(10 * float(lams.mean()), rel=1e-12) for v in refined.damping_.values())
    # EKFAC's Λ of a module sum to the trace of its block of the exact G (true Fisher, sampled): same scale
    assert float(lams.sum()) == pytest.approx(float(G.trace()), rel=0.25)  # 2.70 vs 2.46 here


def test_a_sparse_store_ranked_at_another_damping_warns():
    model, feat, factors, train, G, store = setting()
    d = G.shape[0]

    def sparse_store(damping):
        f = sa.Featurizer(model, sa.ClassificationTask(), projector=sa.SparseEigenbasisProjector(32, factors, damping=damping),
                          batch_size=8, progress=False)
        return f, f.featurize(train)

    f, s = sparse_store("auto")  # EKFAC's λ: not the refined one
    with pytest.warns(UserWarning, match=r"ranked at damping 'auto'.*refined_damping"):
        RefinedInfluence(factors, f, train).fit(s)
    lam = sa.refined_damping(factors)
    assert lam == pytest.approx(10 * float(torch.cat([factors.tensors[b.name]["Lambda"].reshape(-1)
                                                          for b in feat.engine.blocks]).mean()), rel=1e-12)
    f, s = sparse_store(lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RefinedInfluence(factors, f, train).fit(s)


def test_refuses_bad_settings():
    model, feat, factors, train, G, store = setting()
    with pytest.raises(ValueError, match="iterations must be an int >= 0"):
        RefinedInfluence(factors, feat, train, iterations=-1)
    with pytest.raises(ValueError, match="tol must be"):
        RefinedInfluence(factors, feat, train, tol=-0.1)
    with pytest.raises(NotImplementedError, match="one scorer per damping"):
        RefinedInfluence(factors, feat, train).fit(store).score_grid(tiny_data(n=2, seed=5), [0.1, 1.0])


def test_cli_refined_scorer_equals_the_library(files, tmp_path, capsys):
    """``sketchattr score --scorer refined`` on an exact store: the library's scores, top-k and figures."""
    store = tmp_path / "s.h5"
    assert main(build_mlp(files, store, "--projector", "identity", "--num_train", "30")) == 0
    out = tmp_path / "r"
    assert main(["score", "--store", str(store), "--query_data", str(files["root"] / "query.pt"), "--scorer", "refined",
                 "--iterations", "3", "--tol", "0", "--k", "2", "--report", "none", "--output_dir", str(out), *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "refined with 4 Gauss-Newton products" in printed and "(EKFAC) ->" in printed
    task = sa.ClassificationTask()
    train = TensorDataset(torch.from_numpy(files["x"][:30]), torch.from_numpy(files["y"][:30]))
    feat = sa.Featurizer(files["model"], task, projector="identity", progress=False)
    factors = sa.fit_factors(files["model"], task, train, kind="ekfac", modules=["0", "2"], progress=False)
    lib = RefinedInfluence(factors, feat, train, iterations=3, tol=0.0).fit(sa.DiskStore(store))
    top = lib.top_k(TensorDataset(torch.from_numpy(files["xq"]), torch.from_numpy(files["yq"])), k=2)
    rep = json.loads((out / "topk.json").read_text())
    assert [[p["train_index"] for p in r["proponents"]] for r in rep["results"]] == top.proponents.tolist()
    got = torch.tensor([[p["score"] for p in r["proponents"]] for r in rep["results"]], dtype=torch.float64)
    assert torch.allclose(got, top.proponent_scores.double(), rtol=1e-4)
    assert rep["settings"]["refinement"]["ggn_products"] == 4 and rep["settings"]["damping"] == lib.damping_


def test_cli_refine_flags_need_the_refined_scorer(files, tmp_path, capsys):
    store = tmp_path / "s.h5"
    assert main(build_mlp(files, store, "--projector", "identity", "--num_train", "30")) == 0
    argv = ["score", "--store", str(store), "--query_data", str(files["root"] / "query.pt"), "--report", "none", *QUIET]
    assert main(argv + ["--scorer", "ekfac", "--iterations", "3"]) != 0
    assert "--iterations only apply to --scorer refined (got --scorer ekfac)" in capsys.readouterr().err
    assert main(argv + ["--scorer", "refined", "--tol", "-1"]) != 0
    assert "--iterations and --tol must be >= 0" in capsys.readouterr().err

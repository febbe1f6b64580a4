import numpy as np
import pytest
import torch

from dense_reference import ce_loss, dense_influence, margin_fn, per_example_grads
from sketchattr import ClassificationTask, Featurizer, QueryRows, SketchedInfluence
from sketchattr.score.damping import auto_damping, effective_dimension, reproducible_dimension


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
    # 60 rows: the auto λ (noise level tr F̂ / n) damps strongly; a duplicate still ranks top-3 for 3/4 of queries
    for projector, m, k, need in (("identity", None, 3, 15), ("gaussian", 64, 5, 15)):
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
    """λ = max(tr F̂ / n (spikes left out), λ with d_λ = m/3), checked on the explicit F̂ = GᵀG/n (float64)."""
    from sketchattr.score.damping import AUTO_SKETCH_RATIO

    g, _ = _grads(mlp, data)
    n, m = g.shape
    scorer = SketchedInfluence().fit(g)
    lam = scorer.damping_
    F = g.double().T @ g.double() / n
    eye = torch.eye(m, dtype=torch.float64)

    def d_of(lam):
        return torch.trace(torch.linalg.solve(F + lam * eye, F)).item()

    ev = torch.linalg.eigvalsh(F).flip(0)                       # descending
    spikes = 0                                                   # eigenvalues above half of the trace left
    while ev[spikes] > 0.5 * ev[spikes:].sum():
        spikes += 1
    noise = ev[spikes:].sum().item() / n
    if lam == pytest.approx(noise, rel=1e-9):
        assert d_of(lam) <= m / AUTO_SKETCH_RATIO + 1e-6  # the noise level already keeps the sketch faithful
    else:
        assert lam > noise and d_of(lam) == pytest.approx(m / AUTO_SKETCH_RATIO, rel=1e-6)
    assert lam == pytest.approx(auto_damping(scorer.sigma, m, n, scorer.reproducible_dimension_), rel=1e-12)
    assert effective_dimension(scorer.sigma, lam) == pytest.approx(scorer.effective_dimension())


def test_auto_damping_terms():
    """Which term binds, on explicit spectra: the noise level tr/n for a large sketch, the d_λ = m/3
    floor for a small one."""
    sigma = torch.logspace(0, -6, 2000, dtype=torch.float64)
    n = 5000
    lam = auto_damping(sigma, 4096, n)
    assert lam == pytest.approx(float(sigma.sum()) / n, rel=1e-12)
    assert effective_dimension(sigma, lam) < 4096 / 3
    lam = auto_damping(sigma, 30, n)
    assert lam > float(sigma.sum()) / n
    assert effective_dimension(sigma, lam) == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError, match="n"):
        auto_damping(sigma, 30, 0)


def test_auto_damping_leaves_spikes_out_of_the_noise_level():
    """A direction holding more than half of the trace (then of what remains) is signal: the noise
    level is the rest of the trace over n; a spectrum without such a spike keeps tr/n."""
    n = 5000
    bulk = torch.logspace(-1, -6, 2000, dtype=torch.float64)
    spiked = torch.cat([torch.tensor([50.0 * float(bulk.sum()), 2.0 * float(bulk.sum())], dtype=torch.float64), bulk])
    assert auto_damping(spiked, 4096, n) == pytest.approx(float(bulk.sum()) / n, rel=1e-12)
    flat = torch.cat([torch.tensor([0.4 * float(bulk.sum())], dtype=torch.float64), bulk])   # 29% of the trace: no spike
    assert auto_damping(flat, 4096, n) == pytest.approx(float(flat.sum()) / n, rel=1e-12)


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


# ---------------------------------------------------------------------------- Nyström (streamed top-r) fit
def _low_rank_rows(n=120, m=50, r=8, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, m, generator=g, dtype=torch.float64)
    G *= torch.linspace(2.0, 0.2, m, dtype=torch.float64)  # anisotropic columns
    return G + noise * torch.randn(n, m, generator=g, dtype=torch.float64)


def test_nystrom_exact_when_rank_covers_fhat():
    """r ≥ rank F̂: Nyström scores, d_λ, self-influence and the auto λ equal the dense formula."""
    G = _low_rank_rows(r=8)
    q = torch.randn(4, G.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lam = 0.07
    ny = SketchedInfluence(damping=lam, method="nystrom", rank=12, power_iters=0).fit(G)
    assert ny.path == "nystrom" and ny.rank_ == 12
    from dense_reference import dense_influence

    assert torch.allclose(ny.score(q), dense_influence(q, G, lam), atol=1e-9, rtol=1e-9)
    F = G.T @ G / len(G)
    inv = torch.linalg.inv(F + lam * torch.eye(F.shape[0], dtype=F.dtype))
    assert ny.trace == pytest.approx(float(torch.trace(F)), rel=1e-12)
    assert ny.effective_dimension() == pytest.approx(float(torch.trace(F @ inv)), rel=1e-8)
    assert torch.allclose(ny.self_influence(), torch.einsum("id,de,ie->i", G, inv, G), atol=1e-9)
    ex = SketchedInfluence(method="eigen").fit(G)
    assert SketchedInfluence(method="nystrom", rank=12).fit(G).damping_ == pytest.approx(ex.damping_, rel=1e-6)


def test_nystrom_top_r_formula_and_tail():
    """r < rank F̂: the preconditioner is V(Σ+λ)⁻¹Vᵀ + (I − VVᵀ)/λ with V, Σ the top r eigenpairs of the
    explicit F̂ (a spectrum with a gap, one subspace iteration), and the completed spectrum keeps tr F̂."""
    G = _low_rank_rows(n=200, m=60, r=6, noise=1e-3)
    q = torch.randn(3, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    F = G.T @ G / len(G)
    evals, evecs = torch.linalg.eigh(F)
    V, s = evecs[:, -6:], evals[-6:]
    lam = 0.05
    P = V @ torch.diag(1 / (s + lam)) @ V.T + (torch.eye(60, dtype=F.dtype) - V @ V.T) / lam
    ny = SketchedInfluence(damping=lam, method="nystrom", rank=6, power_iters=1).fit(G)
    assert torch.allclose(ny.sigma[:6], s.flip(0), rtol=1e-7)
    assert torch.allclose(ny.score(q), -(q @ P @ G.T), rtol=1e-5, atol=1e-7)
    assert float(ny.sigma.sum()) == pytest.approx(float(torch.trace(F)), rel=1e-10)
    assert len(ny.sigma) == 60  # top 6 + the tail of min(n, m) − 6 eigenvalues
    # against the exact decomposition the scores differ only by the tail (eigenvalues ~1e-6 ≪ λ)
    ex = SketchedInfluence(damping=lam, method="eigen").fit(G)
    assert torch.allclose(ny.score(q), ex.score(q), rtol=1e-3, atol=1e-5)


def test_nystrom_weighted_disk_store_and_auto_choice(tmp_path, monkeypatch):
    """Importance weights and a float32 HDF5 store; method='auto' switches to Nyström above the limit."""
    import sketchattr.score.sketched_influence as si_mod
    from sketchattr.store import DiskStore, StoreMetadata

    G = _low_rank_rows(n=90, m=40, r=5).float()
    w = torch.linspace(0.5, 2.0, 90, dtype=torch.float64)
    store = DiskStore(tmp_path / "s.h5", block_bytes=40 * 4 * 16)  # 16-row blocks: several per pass
    meta = StoreMetadata(projector={"type": "identity"}, modules={"a": 40}, model_fingerprint="t", task="t", dim=40)
    store.prepare(meta, planned=np.arange(90))
    with store.writing():
        store.write(np.arange(90), G, weights=w.numpy())
    Gd = G.double()
    F = (Gd * w[:, None]).T @ Gd / w.sum()
    lam = 0.02
    P = torch.linalg.inv(F + lam * torch.eye(40, dtype=F.dtype))
    q = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ny = SketchedInfluence(damping=lam, method="nystrom", rank=10).fit(store)
    assert torch.allclose(ny.score(QueryRows.unchecked(q)).double(), -(q @ P @ Gd.T), rtol=1e-3, atol=1e-3)  # float32 products, amplified by 1/λ in flat directions
    monkeypatch.setattr(si_mod, "EXACT_FIT_LIMIT", 16)
    assert SketchedInfluence().fit(store).path == "nystrom"
    monkeypatch.setattr(si_mod, "EXACT_FIT_LIMIT", 2048)
    assert SketchedInfluence().fit(store).path == "eigen"
    with pytest.raises(ValueError, match="rank"):
        SketchedInfluence(method="nystrom", rank=0)
    with pytest.raises(ValueError, match="power_iters"):
        SketchedInfluence(method="nystrom", power_iters=-1)
    with pytest.raises(ValueError, match="nystrom"):
        SketchedInfluence(method="lanczos")


# ---------------------------------------------------------------------------- per-module blocks (LoGra-style)
@pytest.mark.parametrize("projector", ["identity", "factorized"])
def test_blocks_path_equals_block_diagonal_dense_formula(mlp, data, projector):
    """method='blocks': −q̂ᵀ blockdiag(F̂_k + λ_k I)⁻¹ĝ with F̂_k the explicit per-module Fisher, λ_k the
    auto rule applied to each block (max(tr F̂_k / n, d_λ = m_k / 3))."""
    from sketchattr import FactorizedProjector
    from sketchattr.score.damping import AUTO_SKETCH_RATIO

    x, y = data
    proj = "identity" if projector == "identity" else FactorizedProjector(3, 4, seed=1)
    feat = Featurizer(mlp, ClassificationTask(), projector=proj, progress=False)
    store = feat.featurize((x, y))
    q = feat.query_rows((x[:5], y[:5]))
    scorer = SketchedInfluence(method="blocks").fit(store)
    G, n = store.rows(), len(x)
    widths = list(feat.selection().dims) if projector == "identity" else [12] * len(feat.selection().dims)
    assert scorer._widths == widths and len(scorer.damping_) == len(widths)
    edges = np.cumsum([0] + widths)
    ref, d_total = torch.zeros(5, n, dtype=torch.float64), 0.0
    for (lo, hi), lam in zip(zip(edges[:-1], edges[1:]), scorer.damping_):
        g = G[:, lo:hi]
        F = g.T @ g / n
        eye = torch.eye(hi - lo, dtype=F.dtype)
        d_lam = torch.trace(torch.linalg.solve(F + lam * eye, F)).item()
        noise = torch.trace(F).item() / n
        assert lam == pytest.approx(noise, rel=1e-9) or d_lam == pytest.approx((hi - lo) / AUTO_SKETCH_RATIO, rel=1e-6)
        ref -= q[:, lo:hi] @ torch.linalg.solve(F + lam * eye, g.T)
        d_total += d_lam
    assert torch.allclose(scorer.score(q), ref, atol=1e-10)
    assert scorer.effective_dimension() == pytest.approx(d_total, rel=1e-8)
    assert torch.allclose(scorer.score(q, damping=0.05), -(q @ torch.block_diag(*[
        torch.linalg.inv(G[:, lo:hi].T @ G[:, lo:hi] / n + 0.05 * torch.eye(hi - lo, dtype=G.dtype))
        for lo, hi in zip(edges[:-1], edges[1:])]) @ G.T), atol=1e-10)


def test_blocks_path_refuses_mixed_rows(mlp, data):
    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), projector="sjlt", m=32, seed=0, progress=False)
    store = feat.featurize((x, y))
    with pytest.raises(ValueError, match="per-module blocks.*'sjlt'"):
        SketchedInfluence(method="blocks").fit(store)
    with pytest.raises(ValueError, match="sum to the store's width 32"):
        SketchedInfluence(method="blocks", block_widths=[10, 10]).fit(store)
    scorer = SketchedInfluence(method="blocks", block_widths=[16, 16]).fit(store)
    with pytest.raises(ValueError, match="2 floats"):
        scorer.score(feat.query_rows((x[:2], y[:2])), damping=(0.1, 0.2, 0.3))


# ---------------------------------------------------------------------------- sketch-noise calibration of λ
def _sketched_store(G, S, kind="gaussian"):
    from sketchattr.store import MemoryStore, StoreMetadata

    meta = StoreMetadata(projector={"type": kind, "m": S.shape[1], "seed": 0}, modules={"a": G.shape[1]}, model_fingerprint="t",
                         task="t", dim=S.shape[1])
    store = MemoryStore()
    store.prepare(meta)
    store.write(np.arange(len(G)), G @ S)
    return store, meta


def test_reproducible_dimension_matches_the_explicit_split_half_formula():
    """Σ_k min(1, v_kᵀF̂_B v_k / σ_k) over the eigenpairs (σ_k, v_k) of F̂_A = Σ_A w g gᵀ / Σ_A w, formed
    explicitly in d-space with torch.linalg (float64, weighted rows, one split); then what it counts:
    rows of a rank-5 structure reproduce ~5 directions, nearly orthogonal rows (n=200 in d=5000)
    almost none (each of a half's n/2 directions counts ~(n/2)/d)."""
    g = torch.Generator().manual_seed(3)
    n, d = 80, 40
    G = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, d, dtype=torch.float64))
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    a, b = perm[: n // 2], perm[n // 2:]
    fa = (G[a] * w[a, None]).T @ G[a] / w[a].sum()
    fb = (G[b] * w[b, None]).T @ G[b] / w[b].sum()
    sig, V = torch.linalg.eigh(fa)
    keep = sig > 1e-10 * sig.max()
    rho = torch.einsum("dk,de,ek->k", V[:, keep], fb, V[:, keep])
    expected = float((rho / sig[keep]).clamp(0, 1).sum())
    H = G * w.sqrt()[:, None]
    assert reproducible_dimension(H @ H.T, w, splits=1, seed=7) == pytest.approx(expected, rel=1e-9)

    # isotropic noise directions of a half count n_A/d each (ρ = s², σ ≈ s²·d/n_A): 95 × 100/10⁴ ≈ 1
    basis = torch.randn(5, 10_000, generator=g, dtype=torch.float64)
    shared = torch.randn(200, 5, generator=g, dtype=torch.float64) @ basis + 1e-2 * torch.randn(200, 10_000, generator=g, dtype=torch.float64)
    assert 4.5 < reproducible_dimension(shared @ shared.T, torch.ones(200, dtype=torch.float64)) < 7.0
    orthogonal = torch.randn(200, 5000, generator=g, dtype=torch.float64)
    assert reproducible_dimension(orthogonal @ orthogonal.T, torch.ones(200, dtype=torch.float64)) < 10


def test_auto_damping_reproducibility_floor_binds_only_below_the_noise_level():
    """With a reproducible dimension r, λ rises to d_λ = r when r is below the d_λ of the other two
    terms, and is unchanged otherwise; the Gram-path scorer measures r from its own rows."""
    sigma = torch.logspace(0, -6, 400, dtype=torch.float64)
    n = 400
    plain = auto_damping(sigma, 10**6, n)
    assert auto_damping(sigma, 10**6, n, reproducible=10.0) > plain
    assert effective_dimension(sigma, auto_damping(sigma, 10**6, n, reproducible=10.0)) == pytest.approx(10.0, rel=1e-6)
    assert auto_damping(sigma, 10**6, n, reproducible=390.0) == plain
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(120, 3000, generator=g, dtype=torch.float64)   # nearly orthogonal: few directions reproduce
    scorer = SketchedInfluence().fit(rows)
    assert scorer.path == "gram" and scorer.reproducible_dimension_ is not None
    assert scorer.damping_ == pytest.approx(auto_damping(scorer.sigma, 3000, 120, scorer.reproducible_dimension_), rel=1e-12)
    assert scorer.effective_dimension() == pytest.approx(max(scorer.reproducible_dimension_, 1.0), rel=1e-6)


def test_out_of_span_energy_matches_the_projection_onto_the_train_span():
    """‖q_⊥‖² = ‖q‖² − ‖P_span(G) q‖² from torch.linalg: exactly on an identity store; from a Gaussian
    sketch (m=600, n=30 rows in d=3000) within the sketch's own fluctuation (√(2/m) ≈ 6% per query)."""
    from sketchattr.store import MemoryStore, StoreMetadata

    g = torch.Generator().manual_seed(1)
    n, d, m = 30, 3000, 600
    G = torch.randn(n, d, generator=g, dtype=torch.float64)
    queries = torch.randn(8, n, generator=g, dtype=torch.float64) @ G * 0.05 + torch.randn(8, d, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(G.T)                                   # orthonormal basis of span(G) [d, n]
    truth = (queries ** 2).sum(1) - ((queries @ Q) ** 2).sum(1)
    exact = MemoryStore()
    exact.prepare(StoreMetadata(projector={"type": "identity"}, modules={"a": d}, model_fingerprint="t", task="t", dim=d))
    exact.write(np.arange(n), G)
    assert torch.allclose(SketchedInfluence().fit(exact).out_of_span_energy(QueryRows.unchecked(queries)), truth, rtol=1e-8)
    S = torch.randn(d, m, generator=g, dtype=torch.float64) / m**0.5
    store, meta = _sketched_store(G, S)
    est = SketchedInfluence().fit(store).out_of_span_energy(QueryRows(queries @ S, meta))
    ratio = est / truth
    assert abs(float(ratio.mean()) - 1) < 0.05 and float((ratio - 1).abs().max()) < 0.25, ratio
    with pytest.raises(ValueError, match="Gram path"):
        SketchedInfluence().fit(_sketched_store(torch.randn(700, 50, dtype=torch.float64), torch.eye(50, dtype=torch.float64))[0]).out_of_span_energy(
            QueryRows.unchecked(torch.randn(2, 50, dtype=torch.float64)))


def test_calibrate_damping_raises_lambda_only_when_queries_leave_the_span():
    """Near-orthogonal train gradients (n=30 in d=3000) under a Gaussian sketch m=600: queries with
    most energy outside their span get λ raised (their sketched out-of-span part is noise amplified by
    (F̂+λ)⁻¹); queries inside the span, and an exact (identity) store, keep the fitted λ."""
    from sketchattr.store import MemoryStore, StoreMetadata

    g = torch.Generator().manual_seed(0)
    n, d, m = 30, 3000, 600
    G = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.3, n, dtype=torch.float64)[:, None]
    S = torch.randn(d, m, generator=g, dtype=torch.float64) / m**0.5
    store, meta = _sketched_store(G, S)
    inside = torch.randn(8, n, generator=g, dtype=torch.float64) @ G
    outside = inside * 0.2 + torch.randn(8, d, generator=g, dtype=torch.float64) * 3.0
    for queries, raised in ((inside, False), (outside, True)):
        scorer = SketchedInfluence().fit(store)
        assert scorer.path == "gram"
        auto = scorer.damping_
        lam = scorer.calibrate_damping(QueryRows(queries @ S, meta))
        assert lam == scorer.damping_ and (lam > 1.5 * auto if raised else lam == auto), (raised, lam / auto)
        assert torch.allclose(scorer.score(QueryRows(queries @ S, meta)), scorer.score(QueryRows(queries @ S, meta), damping=lam))
    exact = MemoryStore()
    exact.prepare(StoreMetadata(projector={"type": "identity"}, modules={"a": d}, model_fingerprint="t", task="t", dim=d))
    exact.write(np.arange(n), G)
    scorer = SketchedInfluence().fit(exact)
    assert scorer.calibrate_damping(QueryRows.unchecked(outside)) == scorer.damping_ == SketchedInfluence().fit(exact).damping_

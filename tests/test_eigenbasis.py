"""EigenbasisProjector: the kept EKFAC eigen-coordinates, against explicit Kronecker formulas."""
import pytest
import torch
from torch import nn

import sketchattr as sa
from sketchattr.curvature.eigenbasis import SPARSE_MATMUL_QUERIES
from dense_reference import ce_loss, margin_fn, per_example_grads
from sketchattr.featurize.rules import KronLayout
from sketchattr.store import StoreMismatchError

TASK = sa.ClassificationTask()


class TinyLM(nn.Module):
    """Embedding (one-hot, diagonal side), LayerNorm (flat block), Linear with and without bias."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm = nn.Embedding(7, 5), nn.LayerNorm(5)
        self.fc, self.head = nn.Linear(5, 6), nn.Linear(6, 3, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.norm(self.emb(ids))))).mean(dim=1)


def setup(n=40):
    torch.manual_seed(0)
    model = TinyLM().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 7, (n, 4), generator=g), torch.randint(0, 3, (n,), generator=g)
    factors = sa.fit_factors(model, TASK, (x, y), kind="ekfac", fisher="empirical", progress=False)
    return model, x, y, factors


def auto_lambda(lam):
    """The default damping ("auto"), written out: max(Λ) / 3e4 per block."""
    return float(lam.max()) / 3e4


def explicit(factors, model):
    """Per block: K (Q_S ⊗ Q_A, identity where a basis is None, diagonal for flat blocks), D = Λ + λ, the
    row-major position of every featurizer-layout coordinate."""
    out = []
    for name in factors.modules:
        lay = factors.layouts[name]
        qs, qa, lam = factors.curvature(name, "ekfac")
        r, c = lay.shape
        qs = torch.eye(r, dtype=torch.float64) if qs is None else qs
        qa = torch.eye(c, dtype=torch.float64) if qa is None else qa
        perm = torch.arange(r * c)
        if isinstance(lay, KronLayout) and lay.bias == "col":
            perm = torch.tensor([o * c + i for o in range(r) for i in range(c - 1)] + [o * c + c - 1 for o in range(r)])
        out.append((torch.kron(qs.contiguous(), qa.contiguous()), lam.reshape(-1), lam.reshape(-1) + auto_lambda(lam), perm))
    return out


@pytest.mark.parametrize("m", [99, 30])
def test_rows_and_scores_equal_truncated_ekfac_formula(m):
    model, x, y, factors = setup()
    proj = sa.EigenbasisProjector(m, factors)
    feat = sa.Featurizer(model, TASK, projector=proj, batch_size=16, progress=False, engine="hooks")
    G, Q = per_example_grads(model, ce_loss, x, y), per_example_grads(model, margin_fn, x[:5], y[:5])
    dims = list(feat.selection().dims)
    assert sum(dims) == 99
    P = proj.matrix(dims)
    assert torch.allclose(P @ P.T, torch.eye(m, dtype=torch.float64), atol=1e-10)  # kept rows of an orthogonal map
    assert torch.allclose(feat.train_rows((x, y)), G @ P.T, atol=1e-12)
    scores = sa.EKFACScorer(factors, feat).fit(feat.featurize((x, y))).score((x[:5], y[:5]))
    # explicit: the m coordinates with the largest Λ/λ_block, −Σ_kept (Kᵀq)(Kᵀg)/(Λ+λ)
    blocks, ratios, parts = explicit(factors, model), [], []
    offset = 0
    for K, lam, D, perm in blocks:
        d = len(perm)
        gv = torch.zeros(G.shape[0], d, dtype=torch.float64)
        qv = torch.zeros(Q.shape[0], d, dtype=torch.float64)
        gv[:, perm], qv[:, perm] = G[:, offset : offset + d], Q[:, offset : offset + d]
        parts.append(((qv @ K) / D, gv @ K))
        ratios.append(lam / auto_lambda(lam))
        offset += d
    keep = torch.topk(torch.cat(ratios), m).indices
    qk, gk = torch.cat([p[0] for p in parts], 1)[:, keep], torch.cat([p[1] for p in parts], 1)[:, keep]
    assert torch.allclose(scores, -qk @ gk.T, atol=1e-10, rtol=1e-8)
    if m == sum(dims):  # every coordinate kept: exact EKFAC
        exact = sa.Featurizer(model, TASK, progress=False)
        ref = sa.EKFACScorer(factors, exact).fit(exact.featurize((x, y))).score((x[:5], y[:5]))
        assert torch.allclose(scores, ref, atol=1e-10) and proj.captured == pytest.approx(1.0)


def test_disk_store_and_checks(tmp_path):
    model, x, y, factors = setup()
    feat = sa.Featurizer(model, TASK, projector=sa.EigenbasisProjector(30, factors), progress=False)
    mem = sa.EKFACScorer(factors, feat).fit(feat.featurize((x, y))).score((x[:4], y[:4]))
    disk = sa.EKFACScorer(factors, feat).fit(feat.featurize((x, y), store="disk", path=tmp_path / "e.h5")).score((x[:4], y[:4]))
    assert torch.allclose(mem, disk.double(), rtol=1e-5, atol=1e-6)  # disk rows are float32
    other = sa.fit_factors(model, TASK, (x[:30], y[:30]), kind="ekfac", fisher="empirical", progress=False)
    feat2 = sa.Featurizer(model, TASK, projector=sa.EigenbasisProjector(30, other), progress=False)
    with pytest.raises(StoreMismatchError, match="projector"):
        feat2.featurize((x, y), store=sa.DiskStore(tmp_path / "e.h5"))
    with pytest.raises(ValueError, match="not the factors' blocks"):
        sa.Featurizer(model, TASK, modules=["fc", "head"], projector=sa.EigenbasisProjector(10, factors), progress=False).train_rows((x, y))
    with pytest.raises(ValueError, match="EKFAC or KFAC"):
        sa.EigenbasisProjector(10, sa.fit_factors(model, TASK, (x, y), kind="diagonal", progress=False))
    with pytest.raises(ValueError, match="more than the 99 coordinates"):
        sa.EigenbasisProjector(100, factors)
    for bad in (-1.0, float("nan"), "max"):  # damping as the scorers take it: "auto", None or a float > 0
        with pytest.raises(ValueError, match="must be 'auto', None or a finite float > 0"):
            sa.SparseEigenbasisProjector(20, factors, damping=bad)
    kept = {d: sa.EigenbasisProjector(30, factors, damping=d).spec() for d in ("auto", None, 0.5)}
    assert len({str(v) for v in kept.values()}) == 3  # the damping is part of the store's projector spec


@pytest.mark.parametrize("k", [99, 12])
def test_sparse_rows_equal_per_example_topk_formula(k):
    """Per example, the k largest |whitened eigen-coordinates| (values + index bits); EKFAC reads them exactly."""
    model, x, y, factors = setup()
    proj = sa.SparseEigenbasisProjector(2 * k, factors)
    feat = sa.Featurizer(model, TASK, projector=proj, batch_size=16, progress=False, engine="hooks")
    store = feat.featurize((x, y))
    assert store.dim == 2 * k
    rows = torch.cat([r for _, r in store.iter_blocks()])
    G, Q = per_example_grads(model, ce_loss, x, y), per_example_grads(model, margin_fn, x[:12], y[:12])
    W, Wq, offset = [], [], 0
    for K, lam, D, perm in explicit(factors, model):
        d = len(perm)
        gv, qv = torch.zeros(G.shape[0], d, dtype=torch.float64), torch.zeros(Q.shape[0], d, dtype=torch.float64)
        gv[:, perm], qv[:, perm] = G[:, offset : offset + d], Q[:, offset : offset + d]
        W.append(gv @ K / D.sqrt())
        Wq.append(qv @ K / D.sqrt())
        offset += d
    W, Wq = torch.cat(W, 1), torch.cat(Wq, 1)
    top = W.abs().topk(k, dim=1).indices
    idx = rows[:, k:].contiguous().view(torch.int32).long()
    assert torch.equal(idx.sort(1).values, top.sort(1).values)  # the same coordinates, exact indices
    assert torch.allclose(rows[:, :k].double(), W.gather(1, idx), atol=1e-5)  # float32 values
    sparse = torch.zeros_like(W).scatter_(1, top, W.gather(1, top))
    scorer = sa.EKFACScorer(factors, feat).fit(store)
    assert SPARSE_MATMUL_QUERIES == 8  # 5 queries gather W_q at the indices, 12 multiply a CSR matrix
    for n in (5, 12):
        scores = scorer.score((x[:n], y[:n]))
        assert torch.allclose(scores, -Wq[:n] @ sparse.T, rtol=1e-4, atol=1e-6 * float(scores.abs().max()))
    scores = scores[:5]
    if k == 99:  # every coordinate: exact EKFAC
        exact = sa.Featurizer(model, TASK, progress=False)
        ref = sa.EKFACScorer(factors, exact).fit(exact.featurize((x, y))).score((x[:5], y[:5]))
        assert torch.allclose(scores, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_sparse_rows_only_for_the_ekfac_family(tmp_path):
    model, x, y, factors = setup()
    feat = sa.Featurizer(model, TASK, projector=sa.SparseEigenbasisProjector(20, factors), progress=False)
    store = feat.featurize((x, y))
    with pytest.raises(ValueError, match="score it with EKFACScorer"):
        sa.SketchedInfluence().fit(store)
    with pytest.raises(ValueError, match="score it with EKFACScorer"):
        sa.TracIn(feat).fit(store)
    mem = sa.EKFACScorer(factors, feat).fit(store).score((x[:3], y[:3]))
    disk = sa.EKFACScorer(factors, feat).fit(feat.featurize((x, y), store="disk", path=tmp_path / "s.h5")).score((x[:3], y[:3]))
    assert torch.equal(mem, disk)  # float32 disk rows keep the index bits
    half = feat.featurize((x, y), store="disk", path=tmp_path / "h.h5", storage_dtype="bfloat16")
    with pytest.raises(ValueError, match="float32"):
        sa.EKFACScorer(factors, feat).fit(half).score((x[:3], y[:3]))
    with pytest.raises(ValueError, match="even"):
        sa.SparseEigenbasisProjector(21, factors)


def test_sparse_width_reads_the_pilot_fidelity_written_out():
    """sparse_width's fidelity for each width = Pearson over pilot pairs of W Wᵀ against W keep_k(W)ᵀ, with W
    the whitened EKFAC coordinates written out (explicit Kronecker eigenbases, autograd gradients,
    damping "auto") and keep_k each example's k = m/2 largest |W|; the chosen width is the narrowest
    candidate reaching the target."""
    from conftest import tiny_data, tiny_mlp
    from dense_reference import ce_loss, dense_whitening, per_example_grads

    from sketchattr.curvature import sparse_width

    model, (x, y) = tiny_mlp(), tiny_data(n=40)
    task = sa.ClassificationTask()
    factors = sa.fit_factors(model, task, (x, y), kind="ekfac", fisher="empirical", batch_size=8, progress=False)
    feat = sa.Featurizer(model, task, projector="identity", batch_size=8, progress=False)
    width = sparse_width(factors, feat, (x, y), target=0.995, pilot=20)
    K, scale = dense_whitening(factors, feat.engine.blocks)
    W = (per_example_grads(model, ce_loss, x[:20], y[:20]) @ K) * scale
    pairs = ~torch.eye(20, dtype=torch.bool)
    exact = W @ W.T
    for m, r in width.fidelity.items():
        top = W.abs().topk(m // 2, dim=1).indices
        kept = torch.zeros_like(W).scatter_(1, top, W.gather(1, top))
        ref = torch.corrcoef(torch.stack([exact[pairs], (W @ kept.T)[pairs]]))[0, 1]
        assert abs(r - float(ref)) < 1e-6, m
    assert list(width.fidelity) == sorted(width.fidelity) and width.d == W.shape[1]
    reached = [m for m, r in width.fidelity.items() if r >= 0.995]
    assert width.m == (reached[0] if reached else max(width.fidelity))
    with pytest.raises(ValueError, match="target"):
        sparse_width(factors, feat, (x, y), target=1.5)

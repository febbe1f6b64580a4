"""EKFAC / KFAC / diagonal / identity curvature scorers on a sketched store, against dense formulas."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dense_reference import ce_loss, margin_fn, per_example_grads
from sketchattr import ClassificationTask, Featurizer, StoreMismatchError
from collections import namedtuple

from sketchattr.curvature import Factors, FactorsMismatchError, UnsupportedModuleError, fit_factors
from sketchattr.featurize.engine import HookEngine
from sketchattr.featurize.selection import select_modules
from sketchattr.score.ekfac import DiagonalScorer, EKFACScorer, IdentityScorer, KFACScorer, query_rank_agreement
from sketchattr.task import sample_categorical

N = 24
TASK = ClassificationTask()
SCORERS = {"ekfac": EKFACScorer, "kfac": KFACScorer, "diagonal": DiagonalScorer}


class Shared(nn.Module):
    """One Linear applied twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def make(name: str):
    """A tiny float64 model with its data (x, y), n = 24, 3 classes."""
    torch.manual_seed(0)
    if name in ("mlp", "mlp_nobias"):
        bias = name == "mlp"
        model, shape = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias)), (5,)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3))
        shape = (2, 6, 6)
    elif name == "seq":  # Linear on [B, T, d]
        model, shape = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)), (3, 4)
    else:
        model, shape = Shared(), (4,)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return model.double(), x, y


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


Spec = namedtuple("Spec", "name d_out d_in bias dim")


def layer_specs(model, names):
    """Shapes of Linear/Conv2d modules read off their weights: DW is [d_out, d_in(+1)]."""
    mods = dict(model.named_modules())
    out = []
    for n in names:
        w, bias = mods[n].weight, mods[n].bias is not None
        out.append(Spec(n, w.shape[0], w[0].numel(), bias, w.shape[0] * (w[0].numel() + bias)))
    return out


class Scale(nn.Module):
    """A module with its own parameter and no layer rule."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


def _fit(model, x, y, kind, **kw):
    kw.setdefault("fisher", "empirical")
    return fit_factors(model, TASK, (x, y), kind=kind, progress=False, **kw)


# ---------------------------------------------------------------------------- dense reference
def _perm(spec):
    """Featurizer-layout position -> row-major index of DW [d_out, d_in(+1)] (weight, then bias)."""
    w = spec.d_in + int(spec.bias)
    idx = [r * w + c for r in range(spec.d_out) for c in range(spec.d_in)]
    return torch.tensor(idx + ([r * w + spec.d_in for r in range(spec.d_out)] if spec.bias else []))


def _eigenvalues(factors, kind, name):
    t = factors.tensors[name]
    return torch.outer(t["LS"], t["LA"]) if kind == "kfac" else t["Lambda"]


def dense_preconditioner(factors, kind, spec, lam):
    """Explicit M of one module in the featurizer layout. KFAC/EKFAC: with row-major vec,
    vec(Q_S X Q_Aᵀ) = (Q_S ⊗ Q_A) vec X, so M = K diag(vec Λ + λ)⁻¹ Kᵀ, K = Q_S ⊗ Q_A."""
    t, p = factors.tensors[spec.name], _perm(spec)
    if kind == "diagonal":
        return torch.diag(1.0 / (t["Lambda"].reshape(-1)[p] + lam))
    K = torch.kron(t["QS"], t["QA"])
    M = K @ torch.diag(1.0 / (_eigenvalues(factors, kind, spec.name).reshape(-1) + lam)) @ K.T
    return M[p][:, p]


def dense_M(factors, kind, specs, damping="auto"):
    """Block-diagonal M over modules; damping "auto" = max(Λ)/3e4, None = 0.1·mean(Λ) per module."""
    blocks = []
    for s in specs:
        if isinstance(damping, dict):
            lam = damping[s.name]
        elif damping == "auto":
            lam = float(_eigenvalues(factors, kind, s.name).max()) / 3e4
        else:
            lam = damping if damping is not None else 0.1 * float(_eigenvalues(factors, kind, s.name).mean())
        blocks.append(dense_preconditioner(factors, kind, s, lam))
    return torch.block_diag(*blocks)


def _row_major(g, spec):
    """Per-example flat gradients [n, dim] (featurizer layout) -> DW [n, d_out, d_in(+1)]."""
    out = torch.zeros(g.shape[0], spec.d_out * (spec.d_in + int(spec.bias)), dtype=g.dtype)
    out[:, _perm(spec)] = g
    return out.reshape(g.shape[0], spec.d_out, -1)


def _positions(module, inp, gout):
    """a [T, d_in(+1)], s [T, d_out] of one example, by explicit padding and slicing (no unfold)."""
    if isinstance(module, nn.Conv2d):
        k, st, p = module.kernel_size[0], module.stride[0], module.padding[0]
        xp = F.pad(inp, (p, p, p, p))[0]
        H, W = gout.shape[-2:]
        a = torch.stack([xp[:, r * st : r * st + k, c * st : c * st + k].reshape(-1) for r in range(H) for c in range(W)])
        s = gout[0].reshape(gout.shape[1], -1).T
    else:
        a, s = inp.reshape(-1, inp.shape[-1]), gout.reshape(-1, gout.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
    return a, s


def manual_covariances(model, x, y):
    """A, S by a per-example loop with retain_grad on module outputs."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    A, S = dict.fromkeys(mods, 0.0), dict.fromkeys(mods, 0.0)
    for xi, yi in zip(x, y):
        seen = {}

        def hook(m, i, o, n):
            o.retain_grad()
            seen[n] = (i[0].detach(), o)

        handles = [m.register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n, m in mods.items()]
        F.cross_entropy(model(xi[None]), yi[None], reduction="sum").backward()
        for h in handles:
            h.remove()
        for n, (inp, out) in seen.items():
            a, s = _positions(mods[n], inp, out.grad)
            A[n], S[n] = A[n] + a.T @ a, S[n] + s.T @ s
    model.zero_grad()
    return {n: A[n] / len(x) for n in mods}, {n: S[n] / len(x) for n in mods}


# ---------------------------------------------------------------------------- 1. hooks
@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "cnn", "seq", "shared"])
def test_hook_gradients_equal_autograd(name):
    model, x, y = make(name)
    engine = HookEngine(model, select_modules(model, _layers(model)))
    with engine.attached():
        cap = engine.run(lambda: TASK.train_loss(model, (x, y)), len(x))
    flat = [cap.grads(k) for k in range(len(engine.blocks))]
    assert torch.allclose(torch.cat(flat, dim=1), per_example_grads(model, ce_loss, x, y), atol=1e-12)
    for b, f in zip(engine.blocks, flat):
        assert torch.equal(b.layout.to_flat(b.layout.from_flat(f)), f)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- 2. covariances
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_covariances_equal_explicit_sums(name):
    model, x, y = make(name)
    factors = _fit(model, x, y, "kfac", batch_size=5)
    A, S = manual_covariances(model, x, y)
    for n in factors.modules:
        assert torch.allclose(factors.tensors[n]["A"], A[n], atol=1e-12)
        assert torch.allclose(factors.tensors[n]["S"], S[n], atol=1e-12)
        t = factors.tensors[n]
        assert torch.allclose(t["QA"] @ torch.diag(t["LA"]) @ t["QA"].T, A[n], atol=1e-10)


def test_true_fisher_samples_labels_reproducibly():
    model, x, y = make("mlp")
    state = torch.get_rng_state()
    true = _fit(model, x, y, "kfac", fisher="true", seed=5, batch_size=N)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    torch.manual_seed(5)
    with torch.no_grad():
        labels = sample_categorical(model(x))
    assert (labels != y).any()
    relabelled = _fit(model, x, labels, "kfac", batch_size=N)
    emp = _fit(model, x, y, "kfac", batch_size=N)
    again = _fit(model, x, y, "kfac", fisher="true", seed=5, batch_size=N)
    other = _fit(model, x, y, "kfac", fisher="true", seed=6, batch_size=N)
    for n in true.modules:
        S = true.tensors[n]["S"]
        assert torch.allclose(S, relabelled.tensors[n]["S"], atol=1e-12)
        assert torch.equal(S, again.tensors[n]["S"])
        assert not torch.allclose(S, emp.tensors[n]["S"]) and not torch.allclose(S, other.tensors[n]["S"])
        assert torch.allclose(true.tensors[n]["A"], emp.tensors[n]["A"], atol=1e-12)


# ---------------------------------------------------------------------------- 3. dense formulas
@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "cnn"])
@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal"])
def test_identity_projector_scores_equal_dense_preconditioner(name, kind):
    model, x, y = make(name)
    feat = Featurizer(model, TASK, projector="identity", batch_size=7, progress=False)
    store = feat.featurize((x, y))
    factors = _fit(model, x, y, kind, batch_size=7)
    specs = layer_specs(model, factors.modules)
    G = per_example_grads(model, ce_loss, x, y)
    Q = per_example_grads(model, margin_fn, x[:5], y[:5])
    dims = np.cumsum([0] + [s.dim for s in specs])
    for s, lo, hi in zip(specs, dims[:-1], dims[1:]):  # Λ from explicit gradients
        dw = _row_major(G[:, lo:hi], s)
        if kind == "ekfac":
            t = factors.tensors[s.name]
            expect = ((t["QS"].T @ dw @ t["QA"]) ** 2).mean(0)
        elif kind == "diagonal":
            expect = (dw**2).mean(0)
        else:
            continue
        assert torch.allclose(factors.tensors[s.name]["Lambda"], expect, atol=1e-12)
    per_module = {sp.name: 0.01 * (k + 1) for k, sp in enumerate(specs)}
    for damping in ("auto", None, 0.05, per_module):
        scorer = SCORERS[kind](factors, feat, damping=damping).fit(store)
        ref = -Q @ dense_M(factors, kind, specs, damping) @ G.T
        assert torch.allclose(scorer.score((x[:5], y[:5])), ref, atol=1e-10, rtol=1e-9)


def test_identity_scorer_is_a_gradient_dot_product():
    model, x, y = make("cnn")
    feat = Featurizer(model, TASK, progress=False)
    scorer = IdentityScorer(feat).fit(feat.featurize((x, y)))
    ref = -per_example_grads(model, margin_fn, x[:4], y[:4]) @ per_example_grads(model, ce_loss, x, y).T
    assert torch.allclose(scorer.score((x[:4], y[:4])), ref, atol=1e-12)


def test_per_module_scores_sum_to_total():
    model, x, y = make("mlp")
    feat = Featurizer(model, TASK, progress=False)
    scorer = EKFACScorer(_fit(model, x, y, "ekfac"), feat).fit(feat.featurize((x, y)))
    parts = scorer.score((x[:3], y[:3]), per_module=True)
    assert list(parts) == ["0", "2"]
    assert torch.allclose(sum(parts.values()), scorer.score((x[:3], y[:3])), atol=1e-12)


# ---------------------------------------------------------------------------- 4. sketched
@pytest.mark.parametrize("name,kind", [("mlp", "ekfac"), ("cnn", "ekfac"), ("cnn", "kfac"), ("mlp_nobias", "diagonal")])
def test_gaussian_sketch_scores_equal_explicit_projection(name, kind):
    model, x, y = make(name)
    feat = Featurizer(model, TASK, projector="gaussian", m=16, seed=3, batch_size=7, progress=False)
    store = feat.featurize((x, y))
    factors = _fit(model, x, y, kind)
    specs = layer_specs(model, factors.modules)
    P = feat.projector.matrix([s.dim for s in specs])
    G = per_example_grads(model, ce_loss, x, y)
    Q = per_example_grads(model, margin_fn, x[:5], y[:5])
    ref = -(P @ dense_M(factors, kind, specs) @ Q.T).T @ (P @ G.T)
    scorer = SCORERS[kind](factors, feat).fit(store)
    assert torch.allclose(scorer.score((x[:5], y[:5])), ref, atol=1e-10, rtol=1e-9)
    top = scorer.top_k((x[:5], y[:5]), k=3)
    assert (top.proponents == torch.argsort(ref, dim=1, descending=True)[:, :3].numpy()).all()


@pytest.mark.parametrize("projector,m", [("identity", None), ("gaussian", 16)])
@pytest.mark.parametrize("kind", ["ekfac", "diagonal"])
def test_score_grid_equals_dense_formula_per_damping(projector, m, kind):
    """One pass of query gradients, many dampings: each slice is −(P M_λ q)ᵀ(P g) with M_λ built explicitly."""
    model, x, y = make("cnn")
    feat = Featurizer(model, TASK, projector=projector, m=m, seed=3, batch_size=7, progress=False)
    store = feat.featurize((x, y))
    factors = _fit(model, x, y, kind)
    specs = layer_specs(model, factors.modules)
    P = feat.projector.matrix([s.dim for s in specs]) if m else torch.eye(sum(s.dim for s in specs), dtype=torch.float64)
    G = per_example_grads(model, ce_loss, x, y)
    Q = per_example_grads(model, margin_fn, x[:5], y[:5])
    dampings = ["auto", None, 1e-3, 0.5, {sp.name: 0.02 * (k + 1) for k, sp in enumerate(specs)}]
    scorer = SCORERS[kind](factors, feat, damping=7.0).fit(store)  # the constructor's damping is not used by the grid
    grid = scorer.score_grid((x[:5], y[:5]), dampings)
    assert grid.shape == (5, 5, N)
    for slice_, damping in zip(grid, dampings):
        ref = -(P @ dense_M(factors, kind, specs, damping) @ Q.T).T @ (P @ G.T)
        assert torch.allclose(slice_, ref, atol=1e-10, rtol=1e-9)
    assert not torch.allclose(grid[2], grid[3])  # the dampings matter at this size
    if projector == "identity":  # exact query gradients as QueryRows take the same path
        rows = feat.query_rows((x[:5], y[:5]))
        assert torch.allclose(scorer.score_grid(rows, dampings), grid, atol=1e-12)
    with pytest.raises(TypeError, match="prepared queries"):
        scorer.score_grid(scorer.prepare_queries((x[:5], y[:5])), dampings)
    with pytest.raises(ValueError, match="empty"):
        scorer.score_grid((x[:5], y[:5]), [])
    with pytest.raises(TypeError, match="takes the query examples"):  # the same message as score()
        scorer.score_grid(42, dampings)
    with pytest.raises(ValueError, match="finite float > 0|damping must be"):
        scorer.score_grid((x[:5], y[:5]), [0.1, -1.0])


# ---------------------------------------------------------------------------- 5. invariances
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher", ["empirical"])  # true-Fisher labels are seeded per batch (so per batch_size)
def test_batch_size_invariance(name, fisher):
    model, x, y = make(name)
    feat = Featurizer(model, TASK, progress=False)
    store = feat.featurize((x, y))
    f1 = _fit(model, x, y, "ekfac", fisher=fisher, batch_size=1)
    f7 = _fit(model, x, y, "ekfac", fisher=fisher, batch_size=7)
    for n in f1.modules:
        for key in ("A", "S", "Lambda"):
            assert torch.allclose(f1.tensors[n][key], f7.tensors[n][key], atol=1e-12), (n, key)
    s1 = EKFACScorer(f1, feat).fit(store).score((x[:4], y[:4]))
    s7 = EKFACScorer(f7, feat).fit(store).score((x[:4], y[:4]))
    assert torch.allclose(s1, s7, atol=1e-9)


@pytest.mark.parametrize("projector,m", [("identity", None), ("gaussian", 12)])
def test_self_influence_is_diagonal_of_train_scores(projector, m):
    model, x, y = make("cnn")
    feat = Featurizer(model, TASK, projector=projector, m=m, progress=False)
    scorer = EKFACScorer(_fit(model, x, y, "ekfac"), feat).fit(feat.featurize((x, y)))
    pairwise = scorer.score((x, y), kind="train")
    sketched = projector != "identity"
    si = scorer.self_influence((x, y), sketched=sketched)
    assert si.shape == (N,) and (si > 0).all()
    assert torch.allclose(-pairwise.diagonal(), si, atol=1e-10)
    if sketched:  # the exact one is close but not equal to the sketched one
        assert not torch.allclose(scorer.self_influence((x, y)), si)


# ---------------------------------------------------------------------------- 6. stages
def test_stages_are_saved_and_resumed(tmp_path):
    model, x, y = make("mlp")
    first = _fit(model, x, y, "ekfac", path=tmp_path)
    assert first.computed == ["covariance", "eigen", "correction"] and first.loaded == []
    again = _fit(model, x, y, "ekfac", path=tmp_path)
    assert again.computed == [] and again.profiler.calls("forward + backward") == 0
    (tmp_path / "correction.pt").unlink()
    resumed = _fit(model, x, y, "ekfac", path=tmp_path, batch_size=5)
    assert resumed.computed == ["correction"] and resumed.loaded == ["covariance", "eigen"]
    assert resumed.profiler.calls("stage: correction") == 1 and resumed.profiler.calls("stage: covariance") == 0
    assert resumed.profiler.calls("forward + backward") == 5  # one pass of 24 rows in batches of 5
    loaded = Factors.load(tmp_path)
    for n in first.modules:
        for key, t in first.tensors[n].items():
            assert torch.allclose(resumed.tensors[n][key], t, atol=1e-12)
            assert torch.equal(loaded.tensors[n][key], resumed.tensors[n][key])
    with pytest.raises(FactorsMismatchError, match="fisher"):
        _fit(model, x, y, "ekfac", fisher="true", path=tmp_path)
    with pytest.raises(FactorsMismatchError, match="max_examples"):
        _fit(model, x, y, "ekfac", max_examples=10, path=tmp_path)
    redone = _fit(model, x, y, "kfac", fisher="true", path=tmp_path, overwrite=True)
    assert redone.computed == ["covariance", "eigen"]
    with torch.no_grad():
        model[0].weight.add_(0.01)
    with pytest.raises(FactorsMismatchError, match="model_fingerprint"):
        _fit(model, x, y, "kfac", fisher="true", path=tmp_path)


# ---------------------------------------------------------------------------- 7. query rank
def test_query_rank():
    model, x, y = make("cnn")
    feat = Featurizer(model, TASK, projector="gaussian", m=32, progress=False)
    factors = _fit(model, x, y, "ekfac")
    store = feat.featurize((x, y))
    full = EKFACScorer(factors, feat).fit(store).score((x[:6], y[:6]))
    exact = EKFACScorer(factors, feat, query_rank=19).fit(store).score((x[:6], y[:6]))
    one = EKFACScorer(factors, feat, query_rank=1).fit(store).score((x[:6], y[:6]))
    assert torch.allclose(exact, full, atol=1e-10)
    assert not torch.allclose(one, full, atol=1e-3)
    agree = query_rank_agreement(EKFACScorer(factors, feat).fit(store), (x[:6], y[:6]), [1, 3])
    assert agree[3]["pearson"] == pytest.approx(1.0) and agree[3]["rel_error"] < 1e-10
    assert 0 < agree[1]["pearson"] < 1 and agree[1]["rel_error"] > 1e-3


# ---------------------------------------------------------------------------- options and errors
def test_low_precision_query_gradients():
    model, x, y = make("mlp")
    feat = Featurizer(model, TASK, projector="gaussian", m=32, progress=False)
    factors, store = _fit(model, x, y, "ekfac"), feat.featurize((x, y))
    ref = EKFACScorer(factors, feat, damping=None).fit(store).score((x[:6], y[:6]))
    low = EKFACScorer(factors, feat, damping=None, query_dtype=torch.bfloat16, score_dtype=torch.float32).fit(store).score((x[:6], y[:6]))
    assert low.dtype == torch.float32
    assert np.corrcoef(low.double().flatten().numpy(), ref.flatten().numpy())[0, 1] > 0.99
    # "auto" allows a condition number of 3e4, which amplifies bf16 rounding more (0.986 here)
    ref = EKFACScorer(factors, feat).fit(store).score((x[:6], y[:6]))
    low = EKFACScorer(factors, feat, query_dtype=torch.bfloat16, score_dtype=torch.float32).fit(store).score((x[:6], y[:6]))
    assert np.corrcoef(low.double().flatten().numpy(), ref.flatten().numpy())[0, 1] > 0.97


def test_profile_tables(capsys):
    model, x, y = make("mlp")
    feat = Featurizer(model, TASK, progress=False)
    factors = fit_factors(model, TASK, (x, y), progress=False, profile=True)
    EKFACScorer(factors, feat, profile=True).fit(feat.featurize((x, y))).score((x[:2], y[:2]))
    out = capsys.readouterr().out
    for word in ("stage: covariance", "stage: correction", "eigendecomposition", "precondition", "score block", "Total"):
        assert word in out
    assert "Mean duration" in out and "Percentage" in out


def test_errors():
    model, x, y = make("mlp")
    with pytest.raises(UnsupportedModuleError, match=r"1 \(Scale: no layer rule\)"):
        fit_factors(nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Linear(4, 3)).double(), TASK, (x, y), progress=False)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 3)).double()
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        fit_factors(conv, TASK, (torch.randn(4, 2, 6, 6, dtype=torch.float64), y[:4]), progress=False)
    with pytest.raises(ValueError, match="kind"):
        fit_factors(model, TASK, (x, y), kind="shampoo")
    feat = Featurizer(model, TASK, projector="gaussian", m=8, seed=0, progress=False)
    factors = _fit(model, x, y, "ekfac")
    other_store = Featurizer(model, TASK, projector="gaussian", m=8, seed=1, progress=False).featurize((x, y))
    with pytest.raises(StoreMismatchError):
        EKFACScorer(factors, feat).fit(other_store)
    with pytest.raises(FactorsMismatchError, match="modules"):
        EKFACScorer(_fit(model, x, y, "ekfac", modules=["2"]), feat)
    with pytest.raises(ValueError, match="diagonal"):
        EKFACScorer(_fit(model, x, y, "diagonal"), feat)
    scorer = EKFACScorer(factors, feat).fit(feat.featurize((x, y)))
    with pytest.raises(ValueError, match="identity"):
        scorer.score((x[:2], y[:2]), per_module=True)
    with pytest.raises(RuntimeError, match="fit"):
        EKFACScorer(factors, feat).score((x[:2], y[:2]))
    for bad in (-1.0, float("inf"), float("nan"), True, {"0": 0.1}, {"0": 0.1, "2": 0.0}, {"0": 0.1, "2": 0.1, "9": 1.0}):
        with pytest.raises(ValueError, match="damping"):
            EKFACScorer(factors, feat, damping=bad)


def test_correction_pass_draws_fresh_labels():
    from sketchattr.curvature.passes import pass_seed

    assert pass_seed(0, 0) == 0 and pass_seed(7, 0) == 7
    assert pass_seed(0, 1) == pass_seed(0, 1) != 0
    assert pass_seed(0, 1) != pass_seed(1, 1)


def test_profiler_merge_and_detail_table():
    from sketchattr.core.profiler import Profiler

    outer, inner = Profiler(), Profiler()
    with outer.record("stage"):
        with inner.record("step"):
            pass
        with inner.record("step"):
            pass
    merged = Profiler().merge(inner, "inner: ")
    assert merged.calls("inner: step") == 2 and merged.wall == pytest.approx(inner.wall)
    both = Profiler().merge(outer).merge(inner, "inner: ")
    assert both.wall == pytest.approx(outer.wall) and both.calls("stage") == 1
    table = inner.table("detail", wall=outer.wall)
    assert f"{outer.wall:.5f}" in table.splitlines()[-1]
    assert all(r[4] <= 100.0 for r in inner.rows(outer.wall))


def test_batch_seeds_are_distinct_and_batch_zero_keeps_the_pass_seed():
    from sketchattr.curvature.passes import batch_seed, pass_seed

    assert batch_seed(3, 0, 0) == pass_seed(3, 0) == 3 and batch_seed(3, 1, 0) == pass_seed(3, 1)
    seeds = {batch_seed(3, p, b) for p in (0, 1) for b in range(50)}
    assert len(seeds) == 100  # all distinct: no batch of the covariance pass reuses a correction-pass seed


def test_distributed_fit_names_the_rank_without_rows_on_every_rank():
    """A rank whose shard is empty must not fail alone (its peers would wait in the gather): every
    rank gathers the shard sizes and raises the same error naming the empty rank."""
    import sketchattr as sa
    from conftest import tiny_data, tiny_mlp
    from sketchattr.store import MemoryStore

    model = tiny_mlp()
    feat = sa.Featurizer(model, sa.ClassificationTask(), projector="sjlt", m=16, batch_size=6, progress=False)
    full = feat.featurize(tiny_data())
    factors = sa.fit_factors(model, sa.ClassificationTask(), tiny_data(), kind="ekfac", progress=False)

    class TwoRanks:  # what torch.distributed's all_gather_object returns for [rank 0 full, rank 1 empty]
        rank, world_size, is_main = 0, 2, True

        def gather_objects(self, mine):
            return [(full.metadata.to_json(), len(full)), (None, 0)]

    for store in (full, MemoryStore()):  # rank 0's view, then rank 1's (an empty, unprepared store)
        with pytest.raises(ValueError, match="rank 1 holds no train rows"):
            sa.EKFACScorer(factors, feat, damping=0.1).fit(store, collective=TwoRanks())
        with pytest.raises(ValueError, match="rank 1 holds no train rows"):
            sa.SketchedInfluence().fit(store, collective=TwoRanks())

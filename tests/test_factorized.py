"""FactorizedProjector: Kronecker sketch from captured layer factors (hook path of the Featurizer)."""
import math

import pytest
import torch
from torch import nn

from conftest import tiny_data, tiny_mlp
from dense_reference import ce_loss, dense_influence, margin_fn, per_example_grads
from sketchattr import ClassificationTask, FactorizedProjector, Featurizer, SketchedInfluence, make_projector
from sketchattr.curvature import UnsupportedModuleError
from sketchattr.featurize import NonFiniteGradientError
from sketchattr.project import block_seed


class MeanOverT(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def _linear_no_bias():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3)).double()


def _sequence_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), MeanOverT(), nn.Linear(6, 3)).double()


def _conv_model():
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)
    ).double()


def _data(shape, n=12, classes=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _inplace_relu():
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).double()


CASES = {
    "linear": (lambda: tiny_mlp(), lambda: tiny_data(n=12)),
    "inplace_relu": (_inplace_relu, lambda: tiny_data(n=12)),
    "linear_no_bias": (_linear_no_bias, lambda: tiny_data(n=12)),
    "sequence": (_sequence_model, lambda: _data((5, 4))),
    "conv": (_conv_model, lambda: _data((2, 6, 6))),
}


def _kron_matrix(model, m_out, m_in, seed):
    """Block-diagonal [K*m_out*m_in, d] over the model's Linear/Conv2d modules (all of them, in
    order), rebuilt from the documented generation rule, columns in the featurizer layout."""
    blocks = []
    layers = [mod for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    for k, mod in enumerate(layers):
        d_out, d_in, bias = mod.weight.shape[0], mod.weight[0].numel(), mod.bias is not None
        g0 = torch.Generator().manual_seed(block_seed(seed, k, 0))
        g1 = torch.Generator().manual_seed(block_seed(seed, k, 1))
        p_out = (torch.randn(m_out, d_out, generator=g0, dtype=torch.float32) / math.sqrt(m_out)).double()
        p_in = (torch.randn(m_in, d_in + bias, generator=g1, dtype=torch.float32) / math.sqrt(m_in)).double()
        kron = torch.kron(p_out, p_in)  # columns: DW = [W | b] flattened row-major
        flat = torch.zeros_like(kron)
        for o in range(d_out):
            for i in range(d_in + bias):
                col = o * d_in + i if i < d_in else d_out * d_in + o  # weight row-major, then bias
                flat[:, col] = kron[:, o * (d_in + bias) + i]
        blocks.append(flat)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("case", list(CASES))
def test_factorized_rows_equal_kronecker_projection_of_autograd_gradients(case):
    model, data = CASES[case][0](), CASES[case][1]()
    x, y = data
    proj = FactorizedProjector(m_out=4, m_in=3, seed=7)
    feat = Featurizer(model, ClassificationTask(), projector=proj, batch_size=5, progress=False)
    kron = _kron_matrix(model, 4, 3, seed=7)
    g = per_example_grads(model, ce_loss, x, y)
    rows = feat.train_rows((x, y))
    n_layers = kron.shape[0] // 12
    assert rows.shape == (len(x), n_layers * 12) and rows.dtype == torch.float64
    assert torch.allclose(rows, g @ kron.T, atol=1e-12)
    q = per_example_grads(model, margin_fn, x[:5], y[:5])
    assert torch.allclose(feat.query_rows((x[:5], y[:5])), q @ kron.T, atol=1e-12)
    # the dense path of the (bound) projector and its explicit matrix agree with the same rule
    dims = list(feat.selection().dims)
    assert torch.allclose(proj.matrix(dims), kron, atol=0)
    blocks = list(g.split(dims, dim=1))
    assert torch.allclose(proj.project(blocks), g @ kron.T, atol=1e-12)
    assert torch.allclose(proj.project_module(blocks[-1], len(dims) - 1), blocks[-1] @ kron[-12:, -dims[-1]:].T, atol=1e-12)
    assert proj.output_dim(dims) == kron.shape[0] == feat.metadata().dim


def test_no_parameter_gradient_is_computed(mlp, data):
    """The hook path asks autograd for output gradients only: the dW = sᵀa products are skipped.
    (The first pass checks one example against plain autograd on the model itself, once.)"""
    x, y = data
    fired = []
    handles = [p.register_hook(lambda g, n=n: fired.append(n)) for n, p in mlp.named_parameters()]
    feat = Featurizer(mlp, ClassificationTask(), projector=FactorizedProjector(3, 3), batch_size=8, progress=False)
    feat.train_rows((x, y))
    assert sorted(fired) == sorted(n for n, _ in mlp.named_parameters())  # the one-example check only
    fired.clear()
    feat.train_rows((x, y))
    assert fired == []
    ce_loss(mlp(x[:2]), y[:2]).backward()  # the same hooks do fire on an ordinary backward
    assert len(fired) == len(handles)
    for h in handles:
        h.remove()
    mlp.zero_grad(set_to_none=True)


def test_hooks_removed_and_model_untouched(mlp, data):
    x, y = data
    for p in mlp.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    mlp.train()
    feat = Featurizer(mlp, ClassificationTask(), projector=FactorizedProjector(3, 3), progress=False)
    feat.train_rows((x, y))
    feat.query_rows((x, y))
    assert all(not m._forward_hooks for m in mlp.modules())
    assert mlp.training
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in mlp.parameters())
    # also when the pass stops early (generator closed) or fails
    it = feat.iter_rows(torch.utils.data.TensorDataset(x, y), torch.arange(len(x)).numpy())
    next(it)
    assert any(m._forward_hooks for m in mlp.modules())
    it.close()
    assert all(not m._forward_hooks for m in mlp.modules())


def test_determinism_by_seed_and_spec(mlp, data):
    x, y = data
    rows = lambda seed, bs: Featurizer(
        mlp, ClassificationTask(), projector=FactorizedProjector(4, 4, seed=seed), batch_size=bs, progress=False
    ).train_rows((x, y))
    a = rows(1, 5)
    assert torch.equal(a, rows(1, 5))
    assert torch.allclose(a, rows(1, 24), atol=1e-12)
    assert not torch.allclose(a, rows(2, 5))
    proj = make_projector("factorized", m_out=4, m_in=2, seed=3)
    assert proj.spec() == {"type": "factorized", "m_out": 4, "m_in": 2, "seed": 3}
    assert make_projector("factorized", m=8).spec() == {"type": "factorized", "m_out": 4, "m_in": 2, "seed": 0}
    with pytest.raises(ValueError, match="either m"):
        make_projector("factorized", m=8, m_out=2, m_in=4)
    with pytest.raises(ValueError, match="needs m"):
        make_projector("factorized")
    by_name = Featurizer(mlp, ClassificationTask(), projector="factorized", m=16, seed=1, batch_size=5, progress=False)
    assert torch.equal(by_name.train_rows((x, y)), a)


def test_sketched_influence_on_factorized_store_equals_dense_formula(mlp, data):
    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), projector=FactorizedProjector(3, 4, seed=1), progress=False)
    store = feat.featurize((x, y))
    assert store.metadata.projector == {"type": "factorized", "m_out": 3, "m_in": 4, "seed": 1}
    assert store.metadata.dim == 2 * 12
    kron = _kron_matrix(mlp, 3, 4, seed=1)
    g = per_example_grads(mlp, ce_loss, x, y)
    q = per_example_grads(mlp, margin_fn, x[:6], y[:6])
    lam = 1e-2
    scores = SketchedInfluence(damping=lam, method="eigen").fit(store).score(feat.query_rows((x[:6], y[:6])))
    assert torch.allclose(scores, dense_influence(q @ kron.T, g @ kron.T, lam), atol=1e-8, rtol=1e-8)


class Scale(nn.Module):
    """Own parameter, no layer rule."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


def test_module_without_rule_falls_back_to_vmap_and_dense_path(data):
    """A module no rule covers: the featurizer warns, computes exact gradients by vmap, and the
    factorized projector sketches its flat block with P_flat (and the others with P_out ⊗ P_in)."""
    x, y = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), Scale(7), nn.Tanh(), nn.Linear(7, 3)).double()
    proj = FactorizedProjector(2, 2, seed=4)
    feat = Featurizer(model, ClassificationTask(), projector=proj, progress=False)
    with pytest.warns(UserWarning, match=r"no layer rule for 1 \(Scale: no layer rule\)"):
        rows = feat.train_rows((x, y))
    assert not feat.uses_hooks and "vmap" in feat.describe()
    g = per_example_grads(model, ce_loss, x, y)
    assert torch.allclose(rows, g @ proj.matrix(list(feat.selection().dims)).T, atol=1e-12)
    with pytest.raises(UnsupportedModuleError, match=r"Scale: no layer rule"):
        Featurizer(model, ClassificationTask(), projector=proj, engine="hooks", progress=False).train_rows((x, y))


def test_other_dtype_runs_on_cast_parameters(data):
    """dtype/device other than the model's: the hook path runs on cast copies (model untouched)."""
    x, y = data
    model = tiny_mlp()
    rows = Featurizer(model, ClassificationTask(), projector=FactorizedProjector(2, 2), dtype=torch.float32,
                      progress=False).train_rows((x, y))
    ref = Featurizer(tiny_mlp().float(), ClassificationTask(), projector=FactorizedProjector(2, 2),
                     progress=False).train_rows((x.float(), y))
    assert rows.dtype == torch.float32 and torch.allclose(rows, ref, atol=1e-5)
    assert next(model.parameters()).dtype == torch.float64


def test_projector_errors(data):
    x, y = data
    with pytest.raises(ValueError, match="bind"):
        FactorizedProjector(2, 2).project([torch.zeros(3, 6, dtype=torch.float64)])
    xn = x.clone()
    xn[13, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"\[13\]"):
        Featurizer(tiny_mlp(), ClassificationTask(), projector=FactorizedProjector(2, 2), batch_size=8,
                   progress=False).train_rows((xn, y))

"""The hook engine and its layer rules, in float64 against autograd per-example gradients."""
import warnings

import pytest
import torch
from torch import nn

from dense_reference import ce_loss, per_example_grads
from sketchattr import ClassificationTask, FactGraSSProjector, FactorizedProjector, Featurizer, SJLTProjector
from sketchattr.featurize import HookMismatchError
from sketchattr.featurize.rules import FlatLayout, KronLayout, LayerRule, rule_for
from sketchattr.featurize.selection import select_modules

TASK = ClassificationTask()


class Conv1D(nn.Module):
    """transformers' Conv1D layout (weight [nx, nf], y = x W + b), recognised by name and shape."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class TinyRMSNorm(nn.Module):
    """Llama-style RMSNorm (weight only, computed in float32 then cast back)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.linspace(0.5, 1.5, d)), eps

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GemmaRMSNorm(TinyRMSNorm):
    """x̂ ⊙ (1 + w): not elementwise-affine in w; matched by name, refused by the first-call check."""

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return h * (1 + self.weight)


class MeanT(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def seq(first, *rest):
    """first layer on [B, T, d] -> tanh -> rest -> mean over T -> Linear head (3 classes)."""
    return nn.Sequential(first, nn.Tanh(), *rest, MeanT(), nn.Linear(6, 3))


def _bn(c):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.2, 0.2)
    return bn


CASES = {  # name: (model builder, input shape or ("ids", T, vocab))
    "linear": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (5,)),
    "linear_seq_nobias": (lambda: seq(nn.Linear(4, 6, bias=False)), (5, 4)),
    "hf_conv1d": (lambda: seq(Conv1D(6, 4)), (5, 4)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), (2, 9)),
    "conv2d_same": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding="same", bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(75, 3)), (2, 5, 5)),
    "embedding": (lambda: seq(nn.Embedding(11, 6, padding_idx=0)), ("ids", 5, 11)),
    "layernorm": (lambda: seq(nn.Linear(4, 6), nn.LayerNorm(6)), (5, 4)),
    "rmsnorm": (lambda: seq(nn.Linear(4, 6), nn.RMSNorm(6)), (5, 4)),
    "llama_rmsnorm": (lambda: seq(nn.Linear(4, 6), TinyRMSNorm(6)), (5, 4)),
    "batchnorm_eval": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), _bn(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)), (2, 5, 5)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)), (2, 5, 5)),
}


def make(name, n=10):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = build().double()
    g = torch.Generator().manual_seed(1)
    if shape[0] == "ids":
        x = torch.randint(0, shape[2], (n, shape[1]), generator=g)
        x[:, -1] = 0  # padding_idx positions get no gradient
    else:
        x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return model.eval(), x, torch.randint(0, 3, (n,), generator=g)


def hook_featurizer(model, projector="identity", **kw):
    return Featurizer(model, TASK, projector=projector, batch_size=4, progress=False, engine="hooks", **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_layer_rule_gradients_equal_autograd(name):
    model, x, y = make(name)
    feat = hook_featurizer(model)
    rows = feat.train_rows((x, y))
    assert feat.uses_hooks
    assert torch.allclose(rows, per_example_grads(model, ce_loss, x, y), atol=1e-12)
    # any projector: SJLT of the exact rows equals the SJLT matrix applied to autograd gradients
    sjlt = hook_featurizer(model, SJLTProjector(8, seed=2))
    dims = list(sjlt.selection().dims)
    assert torch.allclose(sjlt.train_rows((x, y)), rows @ sjlt.projector.matrix(dims).T, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("proj", ["factorized", "factgrass"])
def test_factorized_sketches_of_every_rule_equal_their_matrix(name, proj):
    """Kronecker blocks from their factors (one-hot Embedding rows included), flat blocks from
    their gradients: the rows equal the projector's explicit matrix times autograd gradients."""
    model, x, y = make(name)
    projector = FactorizedProjector(3, 2, seed=5) if proj == "factorized" else FactGraSSProjector(8, m_out=3, m_in=2, seed=5)
    feat = hook_featurizer(model, projector)
    rows = feat.train_rows((x, y))
    g = per_example_grads(model, ce_loss, x, y)
    assert torch.allclose(rows, g @ projector.matrix(list(feat.selection().dims)).T, atol=1e-12)


def test_layouts_and_rules():
    model, _, _ = make("hf_conv1d")
    assert rule_for(model[0]).name == "hf_conv1d"
    blocks = hook_featurizer(model).engine.blocks
    assert blocks[0].layout == KronLayout(4, 6, "row") and blocks[1].layout == KronLayout(3, 6, "col")
    emb, _, _ = make("embedding")
    assert hook_featurizer(emb).engine.blocks[0].layout == KronLayout(11, 6, None)
    ln, _, _ = make("layernorm")
    assert hook_featurizer(ln).engine.blocks[1].layout == FlatLayout(12)
    assert {"linear", "hf_conv1d", "conv", "embedding", "elementwise_norm", "channel_norm"} <= set(LayerRule.registry)


# ---------------------------------------------------------------------------- tied, frozen, shared
class TiedLM(nn.Module):
    """Token + broadcast position embeddings, LayerNorm, an output layer tied to the token embedding."""

    def __init__(self, vocab=9, dim=4, length=5):
        super().__init__()
        self.emb, self.pos, self.norm = nn.Embedding(vocab, dim), nn.Embedding(length, dim), nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        positions = torch.arange(ids.shape[1])[None]  # [1, T]: one call for the whole batch, broadcast
        return self.head(self.norm(torch.tanh(self.emb(ids) + self.pos(positions)))).mean(dim=1)


def _tied(n=8):
    torch.manual_seed(0)
    model = TiedLM().double().eval()
    g = torch.Generator().manual_seed(3)
    return model, torch.randint(0, 9, (n, 5), generator=g), torch.randint(0, 9, (n,), generator=g)


def test_tied_weights_counted_once_and_both_uses_summed():
    model, x, y = _tied()
    sel = select_modules(model)
    assert sel.names == ("emb", "pos", "norm")
    assert sel.total == 9 * 4 + 5 * 4 + 8 == sum(p.numel() for p in model.parameters())
    assert sel.tied[0] == ("head",) and "(tied: head)" in sel.summary()
    assert select_modules(model, ["head"]).names == ("emb",)  # the tied module selects its owner
    feat = hook_featurizer(model)
    assert feat.engine.blocks[0].layout == KronLayout(9, 4, None)
    assert [u.name for u in feat.engine.blocks[0].uses] == ["emb", "head"]
    g = per_example_grads(model, ce_loss, x, y)
    assert torch.allclose(feat.train_rows((x, y)), g, atol=1e-12)
    only = hook_featurizer(model, modules=["head"]).train_rows((x, y))
    assert torch.allclose(only, g[:, : 9 * 4], atol=1e-12)  # head alone covers both uses of the weight
    proj = FactorizedProjector(3, 2, seed=1)
    rows = hook_featurizer(model, proj).train_rows((x, y))
    assert torch.allclose(rows, g @ proj.matrix(list(sel.dims)).T, atol=1e-12)


def test_frozen_parameters_excluded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[0].weight.requires_grad_(False)
    x, y = make("linear")[1:]
    feat = hook_featurizer(model)
    assert feat.selection().param_names == (("0.bias",), ("2.weight", "2.bias"))
    assert feat.engine.blocks[0].layout == FlatLayout(7)  # a lone bias: no Kronecker structure
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert torch.allclose(feat.train_rows((x, y)), per_example_grads(model, ce_loss, x, y, trainable), atol=1e-12)


# ---------------------------------------------------------------------------- safety and fallback
class DirectUse(nn.Module):
    """The embedding weight is also read directly (h @ W.T): a use no hook can see."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)

    def forward(self, ids):
        return torch.tanh(self.emb(ids)).mean(dim=1) @ self.emb.weight[:3].T


def test_first_batch_check_catches_hidden_uses_and_falls_back():
    torch.manual_seed(0)
    model = DirectUse().double()
    x, y = torch.randint(0, 9, (6, 5)), torch.randint(0, 3, (6,))
    with pytest.raises(HookMismatchError, match=r"emb \(embedding\).*outside its module's forward"):
        hook_featurizer(model).train_rows((x, y))
    feat = Featurizer(model, TASK, batch_size=4, progress=False)
    with pytest.warns(UserWarning, match="Falling back to torch.func.vmap"):
        rows = feat.train_rows((x, y))
    assert not feat.uses_hooks
    assert torch.allclose(rows, per_example_grads(model, ce_loss, x, y), atol=1e-12)


def test_non_affine_norm_refused_and_vmap_used():
    torch.manual_seed(0)
    model = seq(nn.Linear(4, 6), GemmaRMSNorm(6)).double()
    x, y = make("layernorm")[1:]
    feat = Featurizer(model, TASK, batch_size=4, progress=False)
    with pytest.warns(UserWarning, match="GemmaRMSNorm is not an affine norm"):
        rows = feat.train_rows((x, y))
    assert torch.allclose(rows, per_example_grads(model, ce_loss, x, y), atol=1e-12)


def test_batchnorm_in_training_mode_is_refused():
    model, x, y = make("batchnorm_eval")
    model.train()
    engine = Featurizer(model, TASK, progress=False).engine  # the featurizer itself would switch to eval
    assert any("training mode" in u for u in engine.uncovered())


def test_unbatched_module_output_is_refused():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.head = nn.Embedding(5, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.head(x + self.pos(torch.arange(x.shape[1])).mean(0))  # [T, d]: no batch dimension

    model = Unbatched().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    with pytest.raises(HookMismatchError, match=r"'pos' \(Embedding\) returned shape \(3, 3\) for a batch of 4"):
        hook_featurizer(model).train_rows((x.mean(1), torch.zeros(4, dtype=torch.long)))


def test_no_warning_and_report_when_covered():
    model, x, y = make("layernorm")
    feat = Featurizer(model, TASK, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feat.train_rows((x, y))
    report = feat.describe()
    assert "elementwise_norm" in report and "flat" in report and "per-example gradients: hook engine" in report


@pytest.mark.parametrize("name", ["linear", "hf_conv1d", "embedding", "layernorm"])
def test_gradient_pieces_reassemble_exactly(name):
    """Pieces a few weight rows at a time (the fused projection path) equal the block's gradient."""
    model, x, y = make(name) if name != "tied" else _tied()
    feat = hook_featurizer(model)
    engine = feat.engine
    with engine.attached():
        cap = engine.run(lambda: TASK.train_loss(model, (x, y)), len(x))
    for k, block in enumerate(engine.blocks):
        full = cap.grads(k)
        out = torch.full_like(full, float("nan"))
        for start, piece in cap.grad_pieces(k, max_elements=len(x) * 7):  # about one row per piece
            out[:, start : start + piece.shape[1]] = piece
        assert torch.allclose(out, full, atol=1e-14), block.name


def test_tied_pieces_mix_one_hot_and_dense_uses():
    model, x, y = _tied()
    engine = hook_featurizer(model).engine
    with engine.attached():
        cap = engine.run(lambda: TASK.train_loss(model, (x, y)), len(x))
    out = torch.cat([piece.clone() for _, piece in cap.grad_pieces(0, max_elements=len(x) * 4 * 2)], dim=1)  # pieces share a workspace
    assert torch.allclose(out, cap.grads(0), atol=1e-14)
    assert torch.allclose(out, per_example_grads(model, ce_loss, x, y)[:, : 9 * 4], atol=1e-12)

"""TensorSketchProjector: rows from the layer factors (FFT of count sketches) equal the explicit
count-sketch matrix of the documented hash rule times autograd's per-example gradients (float64)."""
import pytest
import torch
from torch import nn

from dense_reference import ce_loss, margin_fn, per_example_grads
from sketchattr import ClassificationTask, DiskStore, Featurizer, SketchedInfluence, TensorSketchProjector, make_projector
from sketchattr.project import block_seed
from test_factorized import CASES


def _hash(seed, k, side, d, m):
    g = torch.Generator().manual_seed(block_seed(seed, k, side))
    h = torch.randint(0, m, (d,), generator=g)
    return h, 2 * torch.randint(0, 2, (d,), generator=g) - 1


def _explicit(model, m, seed):
    """[m, d]: column (o, i) of Kronecker module k -> bucket (h_out[o] + h_in[i]) mod m, sign s_out·s_in;
    columns in the featurizer layout (weight row-major, then the bias column)."""
    cols = []
    for k, mod in enumerate(x for x in model.modules() if isinstance(x, (nn.Linear, nn.Conv2d))):
        d_out, d_in, bias = mod.weight.shape[0], mod.weight[0].numel(), mod.bias is not None
        ho, so = _hash(seed, k, 0, d_out, m)
        hi, si = _hash(seed, k, 1, d_in + bias, m)
        block = torch.zeros(m, d_out * d_in + bias * d_out, dtype=torch.float64)
        for o in range(d_out):
            for i in range(d_in + bias):
                col = o * d_in + i if i < d_in else d_out * d_in + o
                block[(ho[o] + hi[i]) % m, col] = float(so[o] * si[i])
        cols.append(block)
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("case", list(CASES))
def test_rows_equal_explicit_count_sketch_of_autograd_gradients(case):
    model, (x, y) = CASES[case][0](), CASES[case][1]()
    proj = TensorSketchProjector(32, seed=5)
    feat = Featurizer(model, ClassificationTask(), projector=proj, batch_size=5, progress=False)
    P = _explicit(model, 32, seed=5)
    assert ((P != 0).sum(0) == 1).all()  # a count sketch: one ±1 per column
    g = per_example_grads(model, ce_loss, x, y)
    rows = feat.train_rows((x, y))
    assert rows.shape == (len(x), 32) and feat.metadata().dim == 32
    assert torch.allclose(rows, g @ P.T, atol=1e-12)
    q = per_example_grads(model, margin_fn, x[:4], y[:4])
    assert torch.allclose(feat.query_rows((x[:4], y[:4])), q @ P.T, atol=1e-12)
    dims = list(feat.selection().dims)
    assert torch.allclose(proj.matrix(dims), P)
    assert torch.allclose(proj.project(list(g.split(dims, dim=1))), g @ P.T, atol=1e-12)


def test_embedding_and_norm_blocks_three_ways():
    """One-hot (Embedding) and flat (LayerNorm) blocks: factor path == dense path == matrix · exact rows."""
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm, self.out = nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 3)

        def forward(self, t):
            return self.out(self.norm(self.emb(t)).mean(1))

    model = Tiny().double()
    x, y = torch.randint(0, 11, (7, 5)), torch.randint(0, 3, (7,))
    exact = Featurizer(model, ClassificationTask(), progress=False)
    G = exact.train_rows((x, y))
    proj = TensorSketchProjector(24, seed=2)
    feat = Featurizer(model, ClassificationTask(), projector=proj, batch_size=3, progress=False)
    assert feat.describe().count("kron") >= 2
    rows = feat.train_rows((x, y))
    dims = list(feat.selection().dims)
    assert torch.allclose(rows, G @ proj.matrix(dims).T, atol=1e-12)
    assert torch.allclose(proj.project(list(G.split(dims, dim=1))), rows, atol=1e-12)


def test_norm_preserved_in_expectation_and_deterministic():
    shapes, dims = [(4, 3, True), (2, 5, False)], [16, 10]
    mats = [TensorSketchProjector(8, seed=s).bind(shapes).matrix(dims) for s in range(2000)]
    gram = torch.stack([p.T @ p for p in mats]).mean(0)
    assert torch.allclose(gram.diagonal(), torch.ones(26, dtype=torch.float64))  # one ±1 per column
    assert torch.allclose(gram, torch.eye(26, dtype=torch.float64), atol=0.1)
    again = TensorSketchProjector(8, seed=7).bind(shapes).matrix(dims)
    assert torch.equal(again, mats[7]) and not torch.equal(mats[7], mats[8])


def test_by_name_spec_store_and_half_precision(tmp_path, mlp, data):
    x, y = data
    assert make_projector("tensorsketch", m=16, seed=3).spec() == {"type": "tensorsketch", "m": 16, "seed": 3}
    feat = Featurizer(mlp, ClassificationTask(), projector="tensorsketch", m=16, seed=3, progress=False)
    store = feat.featurize((x, y), store=DiskStore(tmp_path / "t.h5"))
    assert store.metadata.projector["type"] == "tensorsketch" and store.rows().shape == (len(x), 16)
    scores = SketchedInfluence(damping=1e-2).fit(store).score(feat.query_rows((x[:3], y[:3])))
    assert scores.shape == (3, len(x)) and torch.isfinite(scores).all()
    half = Featurizer(mlp.to(torch.bfloat16), ClassificationTask(), projector="tensorsketch", m=16, seed=3,
                      dtype=torch.bfloat16, progress=False).train_rows((x.to(torch.bfloat16), y))
    ref = store.rows().float()
    assert half.dtype == torch.bfloat16
    assert float((half.float() - ref).norm() / ref.norm()) < 0.05
    with pytest.raises(ValueError, match="m must be"):
        TensorSketchProjector(0)

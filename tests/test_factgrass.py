"""FactGraSSProjector: masked Kronecker factors + SJLT, against an explicit matrix of the documented rule;
half-precision featurization and storage end to end."""
import copy
import math

import pytest
import torch
from torch import nn

from conftest import tiny_data, tiny_mlp
from dense_reference import ce_loss, margin_fn, per_example_grads
from sketchattr import ClassificationTask, DiskStore, FactGraSSProjector, Featurizer, SketchedInfluence, make_projector
from sketchattr.project import block_seed
from test_factorized import CASES


def _mask(seed, k, side, d, keep):
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(block_seed(seed, k, side)))[: min(keep, d)]
    p = torch.zeros(len(perm), d, dtype=torch.float64)
    p[torch.arange(len(perm)), perm] = math.sqrt(d / len(perm))
    return p


def _sjlt(seed, widths, m, c):
    """SJLT over modules of the given widths (one chunk each), from sjlt.py's documented rule."""
    cols = []
    for k, w in enumerate(widths):
        gen = torch.Generator().manual_seed(block_seed(seed, k, 0))
        idx = torch.randint(0, m, (w, c), generator=gen)
        signs = torch.randint(0, 2, (w, c), generator=gen) * 2 - 1
        block = torch.zeros(m, w, dtype=torch.float64)
        for j in range(w):
            for r in range(c):
                block[idx[j, r], j] += signs[j, r] / math.sqrt(c)
        cols.append(block)
    return torch.cat(cols, dim=1)


def _explicit(model, m, m_out, m_in, seed, c):
    """[m, d]: SJLT · blockdiag(M_out ⊗ M_in) with columns in the featurizer layout."""
    blocks, widths = [], []
    for k, mod in enumerate(x for x in model.modules() if isinstance(x, (nn.Linear, nn.Conv2d))):
        d_out, d_in, bias = mod.weight.shape[0], mod.weight[0].numel(), mod.bias is not None
        kron = torch.kron(_mask(seed, k, 0, d_out, m_out), _mask(seed, k, 1, d_in + bias, m_in))
        flat = torch.zeros_like(kron)
        for o in range(d_out):
            for i in range(d_in + bias):
                flat[:, o * d_in + i if i < d_in else d_out * d_in + o] = kron[:, o * (d_in + bias) + i]
        blocks.append(flat)
        widths.append(flat.shape[0])
    return _sjlt(block_seed(seed, 0, 2), widths, m, c) @ torch.block_diag(*blocks)


@pytest.mark.parametrize("case", list(CASES))
def test_factgrass_rows_equal_explicit_matrix_times_autograd_gradients(case):
    model, (x, y) = CASES[case][0](), CASES[case][1]()
    proj = FactGraSSProjector(24, m_out=3, m_in=4, seed=5, c=2)
    feat = Featurizer(model, ClassificationTask(), projector=proj, batch_size=5, progress=False)
    P = _explicit(model, 24, 3, 4, seed=5, c=2)
    g = per_example_grads(model, ce_loss, x, y)
    rows = feat.train_rows((x, y))
    assert rows.shape == (len(x), 24) and feat.metadata().dim == 24
    assert torch.allclose(rows, g @ P.T, atol=1e-12)
    q = per_example_grads(model, margin_fn, x[:4], y[:4])
    assert torch.allclose(feat.query_rows((x[:4], y[:4])), q @ P.T, atol=1e-12)
    dims = list(feat.selection().dims)
    assert torch.allclose(proj.matrix(dims), P, atol=1e-14)
    assert torch.allclose(proj.project(list(g.split(dims, dim=1))), g @ P.T, atol=1e-12)


def test_factgrass_is_unbiased_and_deterministic():
    shapes, dims = [(4, 3, True), (2, 5, False)], [16, 10]
    mats = [FactGraSSProjector(8, m_out=2, m_in=3, seed=s).bind(shapes).matrix(dims) for s in range(3000)]
    gram = torch.stack([p.T @ p for p in mats]).mean(0)
    assert torch.allclose(gram, torch.eye(sum(dims), dtype=torch.float64), atol=0.12)
    assert abs(float(gram.diagonal().mean()) - 1) < 0.02
    again = FactGraSSProjector(8, m_out=2, m_in=3, seed=7).bind(shapes).matrix(dims)
    assert torch.equal(again, mats[7]) and not torch.equal(mats[7], mats[8])


def test_factgrass_by_name_spec_and_store(mlp, data):
    x, y = data
    proj = make_projector("factgrass", m=8, seed=3)
    assert proj.spec() == {"type": "factgrass", "m": 8, "m_out": 8, "m_in": 4, "c": 1, "seed": 3}
    feat = Featurizer(mlp, ClassificationTask(), projector="factgrass", m=8, seed=3, progress=False)
    store = feat.featurize((x, y))
    assert store.metadata.projector == proj.spec() and store.rows().shape == (len(x), 8)
    scores = SketchedInfluence(damping=1e-2).fit(store).score(feat.query_rows((x[:3], y[:3])))
    assert scores.shape == (3, len(x)) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="m must be"):
        FactGraSSProjector(0)



@pytest.mark.parametrize("dtype,storage", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
@pytest.mark.parametrize("projector", ["sjlt", "factorized", "factgrass"])
def test_half_precision_end_to_end_on_disk(tmp_path, dtype, storage, projector):
    """Gradients computed in bf16/fp16, stored as bf16/fp16 on disk, scored: close to fp32."""
    x, y = tiny_data(n=40)
    x = x.float()

    def scores(net, dt, store):
        feat = Featurizer(net, ClassificationTask(), projector=projector, m=64, seed=1, dtype=dt, batch_size=16, progress=False)
        st = feat.featurize((x, y), store=store)
        return st, SketchedInfluence(damping=1e-2).fit(st).score(feat.query_rows((x[:5], y[:5]))).float()

    model = tiny_mlp().float()
    _, ref = scores(model, torch.float32, "none")
    # the hook paths run the model itself, so they get a half-precision copy
    half = model if projector == "sjlt" else copy.deepcopy(model).to(dtype)
    st, low = scores(half, dtype, DiskStore(tmp_path / "s.h5", storage_dtype=storage))
    assert st.rows().dtype == dtype
    rel = float((low - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel

import numpy as np
import pytest
import torch

from dense_reference import ce_loss, margin_fn, per_example_grads
from sketchattr import ClassificationTask, Featurizer, MemoryStore
from sketchattr.featurize import NonFiniteGradientError


def test_train_rows_equal_autograd_loop(mlp, data):
    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), batch_size=5, progress=False)
    rows = feat.train_rows((x, y))
    assert rows.dtype == torch.float64
    assert torch.allclose(rows, per_example_grads(mlp, ce_loss, x, y), atol=1e-12)


def test_query_rows_are_measurement_gradients(mlp, data):
    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), batch_size=7, progress=False)
    assert torch.allclose(feat.query_rows((x, y)), per_example_grads(mlp, margin_fn, x, y), atol=1e-12)


def test_module_subset_equals_restricting_parameters(mlp, data):
    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), modules=["2"], progress=False)
    ref = per_example_grads(mlp, ce_loss, x, y, param_names={"2.weight", "2.bias"})
    assert torch.allclose(feat.train_rows((x, y)), ref, atol=1e-12)
    last1 = Featurizer(mlp, ClassificationTask(), modules=1, progress=False)
    assert torch.allclose(last1.train_rows((x, y)), ref, atol=1e-12)


def test_batch_size_invariance_and_dtype(mlp, data):
    x, y = data
    a = Featurizer(mlp, ClassificationTask(), batch_size=1, progress=False).train_rows((x, y))
    b = Featurizer(mlp, ClassificationTask(), batch_size=24, progress=False).train_rows((x, y))
    assert torch.allclose(a, b, atol=1e-13)
    c = Featurizer(mlp, ClassificationTask(), dtype=torch.float32, progress=False).train_rows((x, y))
    assert c.dtype == torch.float32 and torch.allclose(c.double(), a, atol=1e-5)


def test_featurize_into_store_keeps_indices_and_skips_done_rows(mlp, data):
    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), projector="gaussian", m=8, seed=3, progress=False)
    store = feat.featurize((x, y), indices=[3, 5, 7])
    assert store.indices.tolist() == [3, 5, 7]
    feat.featurize((x, y), store=store, indices=[5, 7, 9, 11])
    assert store.indices.tolist() == [3, 5, 7, 9, 11]
    full = feat.train_rows((x, y))
    assert torch.allclose(store.rows(), full[[3, 5, 7, 9, 11]])


def test_nan_gradient_names_the_row(mlp, data):
    x, y = data
    x = x.clone()
    x[13, 2] = float("nan")
    feat = Featurizer(mlp, ClassificationTask(), batch_size=8, progress=False)
    with pytest.raises(NonFiniteGradientError, match=r"\[13\]"):
        feat.train_rows((x, y))


def test_bad_inputs(mlp, data):
    x, y = data
    with pytest.raises(ValueError, match="empty"):
        Featurizer(mlp, ClassificationTask(), progress=False).train_rows((x[:0], y[:0]))
    with pytest.raises(TypeError, match="Task"):
        Featurizer(mlp, object())
    with pytest.raises(ValueError, match="indices"):
        Featurizer(mlp, ClassificationTask(), progress=False).train_rows((x, y), indices=[0, 99])
    with pytest.raises(ValueError, match="available"):
        Featurizer(mlp, ClassificationTask(), modules=["x"], progress=False).train_rows((x, y))


def test_sampled_labels_are_reproducible(mlp, data):
    x, y = data
    feat = Featurizer(mlp, ClassificationTask(), progress=False)
    ds = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    a = torch.cat([r for _, r in feat.iter_rows(ds, np.arange(len(x)), sample=True)])
    torch.manual_seed(0)
    b = torch.cat([r for _, r in feat.iter_rows(ds, np.arange(len(x)), sample=True)])
    assert torch.equal(a, b)
    assert not torch.allclose(a, feat.train_rows((x, y)))


def test_boundary_errors_name_what_was_expected():
    """modules of a wrong type, a sketch too big for memory (estimated, nothing allocated) and a
    dataset where sketched query rows are expected each raise a message naming the fix."""
    import sketchattr as sa

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for bad in (True, 3.5, {"0"}):
        with pytest.raises(TypeError, match="modules must be None/'all', an int N"):
            sa.Featurizer(model, sa.ClassificationTask(), modules=bad, progress=False).train_rows((x, y))
    for proj in ("gaussian", "sjlt"):
        with pytest.raises(ValueError, match=r"needs about \d+\.\d GiB per batch .*m=1,000,000,000.*memory budget"):
            sa.Featurizer(model, sa.ClassificationTask(), projector=proj, m=10**9, progress=False).train_rows((x, y))
    small = sa.Featurizer(model, sa.ClassificationTask(), projector="sjlt", m=4096, memory_budget_gib=1e-4, progress=False)
    with pytest.raises(ValueError, match="memory budget of 0.0 GiB"):
        small.train_rows((x, y))
    feat = sa.Featurizer(model, sa.ClassificationTask(), projector="sjlt", m=8, progress=False)
    scorer = sa.SketchedInfluence().fit(feat.featurize((x, y)))
    with pytest.raises(TypeError, match=r"got a tuple.*featurizer.query_rows\(queries\)"):
        scorer.score((x, y))

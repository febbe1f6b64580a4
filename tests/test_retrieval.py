"""InfluenceIndex (faiss nearest-neighbour top-k) against the scorers' streaming top_k."""
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_data, tiny_mlp

from sketchattr import (
    ClassificationTask,
    DiskStore,
    Featurizer,
    MemoryStore,
    SketchedInfluence,
    SparseEigenbasisProjector,
    StoreMetadata,
    StoreMismatchError,
)
from sketchattr.curvature import fit_factors
from sketchattr.sample import WeightedSampler
from sketchattr.score.ekfac import EKFACScorer
from sketchattr.score.retrieval import InfluenceIndex, sidecar_path


@pytest.fixture
def faiss():
    return pytest.importorskip("faiss")


def spectrum_store(n: int = 400, m: int = 16, seed: int = 0, fingerprint: str = "abc", store=None):
    """Rows [n, m] float32 with a decaying spectrum, dataset indices 1000 + 3i."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, m, generator=g) * torch.logspace(0, -2, m)
    store = store if store is not None else MemoryStore()
    meta = StoreMetadata(projector={"type": "given", "m": m}, modules={"names": ["fc"]},  # plain-tensor queries
                         model_fingerprint=fingerprint, task="t", dim=m)
    store.prepare(meta)
    store.write(1000 + 3 * np.arange(n), rows)
    return store


def queries(m: int = 16, n: int = 6, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed)) * torch.logspace(0, -2, m)


def assert_same_top(a, b):
    for ids, sc in (("proponents", "proponent_scores"), ("opponents", "opponent_scores")):
        np.testing.assert_array_equal(np.asarray(getattr(a, ids)), np.asarray(getattr(b, ids)))
        want = np.asarray(getattr(b, sc))
        np.testing.assert_allclose(np.asarray(getattr(a, sc)), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    found, truth = np.asarray(found).tolist(), np.asarray(truth).tolist()
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_exact_index_equals_scorer_top_k_in_memory(faiss):
    scorer = SketchedInfluence().fit(spectrum_store())
    index = InfluenceIndex(scorer, progress=False)
    q = queries()
    top = index.top_k(q, k=7)
    assert top.proponents.shape == top.opponent_scores.shape == (6, 7) and np.asarray(top.proponent_scores).dtype == np.float32
    assert_same_top(top, scorer.top_k(q, k=7))
    assert_same_top(index.top_k(q, k=3, damping=0.05), scorer.top_k(q, k=3, damping=0.05))  # any λ, same index
    pro, opp = np.asarray(top.proponent_scores), np.asarray(top.opponent_scores)
    assert (np.diff(pro, axis=1) <= 0).all() and (np.diff(opp, axis=1) >= 0).all()


def test_exact_index_equals_scorer_top_k_on_weighted_disk_store(faiss, tmp_path):
    model, (x, y) = tiny_mlp(), tiny_data(n=80)
    feat = Featurizer(model, ClassificationTask(), projector="gaussian", m=12, seed=0, batch_size=16, progress=False)
    sampler = WeightedSampler(np.linspace(0.2, 3.0, 80), size=50, seed=1)
    store = feat.featurize((x, y), store=DiskStore(tmp_path / "s.h5", block_bytes=12 * 4 * 9), sampler=sampler)
    assert len(store) == 50 and np.ptp(store.weights) > 0  # importance weights that F̂ uses
    scorer = SketchedInfluence().fit(store)
    q = feat.query_rows((x[:5], y[:5]))
    index = InfluenceIndex(scorer, progress=False)  # blocks of 9 rows
    assert index.ntotal == 50 and set(np.asarray(index.top_k(q, k=50).proponents[0]).tolist()) == set(store.indices)
    assert_same_top(index.top_k(q, k=6), scorer.top_k(q, k=6))


def test_ivf_and_hnsw_recall(faiss):
    scorer = SketchedInfluence().fit(spectrum_store(n=3000, m=16))
    q = queries(n=40)
    truth = scorer.top_k(q, k=10)
    ivf = InfluenceIndex(scorer, kind="ivf", nlist=32, progress=False)
    assert ivf.params["nlist"] == 32 and ivf.nprobe == 2
    ivf.nprobe = 32  # every list: exhaustive
    top = ivf.top_k(q, k=10)
    assert recall(top.proponents, truth.proponents) >= 0.9 and recall(top.opponents, truth.opponents) >= 0.9
    with pytest.raises(ValueError, match="at most nlist = 32"):
        ivf.nprobe = 33
    hnsw = InfluenceIndex(scorer, kind="hnsw", ef_search=256, progress=False)
    assert recall(hnsw.top_k(q, k=10).proponents, truth.proponents) >= 0.9
    with pytest.raises(AttributeError, match="kind='ivf'"):
        hnsw.nprobe = 4


def test_save_load_and_refusal_of_another_store(faiss, tmp_path):
    scorer = SketchedInfluence().fit(spectrum_store(n=500))
    index = InfluenceIndex(scorer, kind="ivf", nlist=8, nprobe=8, progress=False)
    path = index.save(tmp_path / "idx.faiss")
    assert sidecar_path(path).exists()
    loaded = InfluenceIndex.load(path, scorer)
    assert loaded.kind == "ivf" and loaded.nprobe == 8
    assert_same_top(loaded.top_k(queries(), k=5), index.top_k(queries(), k=5))
    other_model = SketchedInfluence().fit(spectrum_store(n=500, fingerprint="xyz"))
    with pytest.raises(StoreMismatchError, match="model_fingerprint: index has 'abc', scorer's store has 'xyz'"):
        InfluenceIndex.load(path, other_model)
    other_rows = SketchedInfluence().fit(spectrum_store(n=499))
    with pytest.raises(StoreMismatchError, match="500 rows"):
        InfluenceIndex.load(path, other_rows)
    scorer.fit(spectrum_store(n=500, fingerprint="xyz"))  # refitted elsewhere after the build
    with pytest.raises(StoreMismatchError, match="fitted again"):
        index.top_k(queries(), k=5)


def test_ekfac_scorer(faiss):
    model, (x, y) = tiny_mlp(), tiny_data(n=40)
    feat = Featurizer(model, ClassificationTask(), projector="sjlt", m=16, seed=0, batch_size=20, progress=False)
    factors = fit_factors(model, ClassificationTask(), (x, y), progress=False)
    scorer = EKFACScorer(factors, feat).fit(feat.featurize((x, y)))
    prepared = scorer.prepare_queries((x[:4], y[:4]))
    index = InfluenceIndex(scorer, progress=False)
    assert_same_top(index.top_k(prepared, k=5), scorer.top_k(prepared, k=5))
    assert_same_top(index.top_k((x[:4], y[:4]), k=5), scorer.top_k(prepared, k=5))  # a dataset is prepared
    sparse = Featurizer(model, ClassificationTask(), projector=SparseEigenbasisProjector(8, factors), progress=False)
    with pytest.raises(ValueError, match="'eigen_topk' projector scores through its own inner"):
        InfluenceIndex(EKFACScorer(factors, sparse).fit(sparse.featurize((x, y))))


def test_errors_name_what_is_expected(faiss):
    with pytest.raises(RuntimeError, match="not fitted; call scorer.fit"):
        InfluenceIndex(SketchedInfluence())
    scorer = SketchedInfluence().fit(spectrum_store(n=50))
    with pytest.raises(ValueError, match="kind must be one of"):
        InfluenceIndex(scorer, kind="lsh")
    index = InfluenceIndex(scorer, progress=False)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 50\]"):
        index.top_k(queries(), k=51)
    with pytest.raises(ValueError, match=r"query rows must be \[n_query, 16\]"):
        index.top_k(torch.zeros(2, 15), k=3)
    with pytest.raises(TypeError, match="supports SketchedInfluence"):
        InfluenceIndex(object())


def test_missing_faiss_names_the_install(monkeypatch):
    scorer = SketchedInfluence().fit(spectrum_store(n=20))
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match=r"pip install faiss-cpu .*sketchattr\[faiss\]"):
        InfluenceIndex(scorer)
    with pytest.raises(RuntimeError, match="not fitted"):  # checked before faiss is needed
        InfluenceIndex(SketchedInfluence())

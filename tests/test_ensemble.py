"""EnsembleInfluence against dense per-member formulas (float64, tiny MLPs; sketchattr/score/ensemble.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import tiny_data, tiny_mlp
from dense_reference import ce_loss, margin_fn, per_example_grads
import sketchattr as sa
from sketchattr.score.damping import auto_damping
from sketchattr.score.ensemble import EnsembleInfluence, EnsembleQueries, featurize_members
from sketchattr.store import DiskStore, StoreMismatchError

TASK = sa.ClassificationTask()
M = 12


@pytest.fixture(scope="module")
def setup():
    models = [tiny_mlp(seed=s) for s in (0, 1, 2)]
    x, y = tiny_data(n=30)
    xq, yq = tiny_data(n=5, seed=7)
    return models, (x, y), (xq, yq)


def _dense_member(model, feat, train, query):
    """−q̂ᵀ(F̂ + λI)⁻¹ĝ_i: explicit per-example gradients, explicit sketch P, explicit F̂, auto λ and a solve."""
    (x, y), (xq, yq) = train, query
    P = feat.projector.matrix(feat.metadata("train").modules["dims"])  # one random stream per module
    G = per_example_grads(model, ce_loss, x, y) @ P.T
    Q = per_example_grads(model, margin_fn, xq, yq) @ P.T
    fhat = G.T @ G / len(G)
    lam = auto_damping(torch.linalg.eigvalsh(fhat).clamp(min=0), M, len(G))
    return -torch.linalg.solve(fhat + lam * torch.eye(M, dtype=G.dtype), Q.T).T @ G.T, lam


def test_scores_are_mean_of_dense_member_scores(setup):
    models, train, query = setup
    feats, stores = featurize_members(models, TASK, train, projector="gaussian", m=M, seed=3, batch_size=7, progress=False)
    assert [f.projector.spec()["seed"] for f in feats] == [3, 4, 5]  # independent sketches per member
    ens = EnsembleInfluence([sa.SketchedInfluence(featurizer=f) for f in feats]).fit(stores)
    refs = []
    for model, feat, member in zip(models, feats, ens.members):
        ref, lam = _dense_member(model, feat, train, query)
        assert member.damping_ == pytest.approx(lam, rel=1e-9)  # each member its own auto λ
        alone = sa.SketchedInfluence(featurizer=feat).fit(feat.featurize(train)).score(query)
        assert torch.allclose(alone, ref, atol=1e-10, rtol=1e-8)
        refs.append(ref)
    mean = torch.stack(refs).mean(0)
    scores = ens.score(query)
    assert scores.shape == (5, 30) and torch.allclose(scores, mean, atol=1e-10, rtol=1e-8)
    for got, ref in zip(ens.member_scores(query), refs):
        assert torch.allclose(got, ref, atol=1e-10, rtol=1e-8)
    # streamed in small blocks, from a prepared form, from per-member QueryRows: the same matrix
    prepared = ens.prepare_queries(query)
    assert isinstance(prepared, EnsembleQueries) and len(prepared) == 5
    small = EnsembleInfluence(ens.members, block_rows=4)
    small.fit(stores)
    assert torch.allclose(small.score(prepared), mean, atol=1e-10, rtol=1e-8)
    assert torch.allclose(ens.score([f.query_rows(query) for f in feats]), mean, atol=1e-10, rtol=1e-8)
    # top-k of the averaged matrix
    top = small.top_k(query, k=4)
    assert torch.equal(top.proponents, torch.argsort(mean, dim=1, descending=True)[:, :4])
    assert torch.equal(top.opponents, torch.argsort(mean, dim=1)[:, :4])
    assert torch.allclose(top.proponent_scores, mean.sort(dim=1, descending=True).values[:, :4], atol=1e-10)


def test_weights_and_rms_normalization(setup):
    models, train, query = setup
    feats, stores = featurize_members(models, TASK, train, projector="gaussian", m=M, seed=0, progress=False)
    members = lambda: [sa.SketchedInfluence(featurizer=f) for f in feats]
    each = EnsembleInfluence(members()).fit(stores).member_scores(query)
    w = [1.0, 2.0, 5.0]
    got = EnsembleInfluence(members(), weights=w).fit(stores).score(query)
    assert torch.allclose(got, sum(wi * s for wi, s in zip(w, each)) / sum(w), atol=1e-10)
    rms = EnsembleInfluence(members(), normalize="rms", block_rows=7).fit(stores).score(query)
    expect = torch.stack([s / s.pow(2).mean(dim=1, keepdim=True).sqrt() for s in each]).mean(0)
    assert torch.allclose(rms, expect, atol=1e-10)


def test_ekfac_members(setup):
    models, train, query = setup
    feats, stores = featurize_members(models, TASK, train, projector="gaussian", m=M, seed=1, batch_size=10, progress=False)
    factors = [sa.fit_factors(mdl, TASK, train, kind="ekfac", batch_size=10, progress=False) for mdl in models]
    ens = EnsembleInfluence([sa.EKFACScorer(fc, f) for fc, f in zip(factors, feats)]).fit(stores)
    alone = [sa.EKFACScorer(fc, f).fit(s).score(query) for fc, f, s in zip(factors, feats, stores)]
    mean = torch.stack(alone).mean(0)
    assert torch.allclose(ens.score(query), mean, atol=1e-10)
    assert torch.equal(ens.top_k(query, k=3).proponents, torch.argsort(mean, dim=1, descending=True)[:, :3])
    # a mixed ensemble (one EKFAC member, one regularized member) also averages
    mixed = EnsembleInfluence([sa.EKFACScorer(factors[0], feats[0]), sa.SketchedInfluence(featurizer=feats[1])]).fit(stores[:2])
    other = sa.SketchedInfluence(featurizer=feats[1]).fit(stores[1]).score(query)
    assert torch.allclose(mixed.score(query), (alone[0] + other) / 2, atol=1e-10)


def test_disk_store_groups_and_resume(setup, tmp_path):
    models, train, query = setup
    path = tmp_path / "ens.h5"
    full_feats, full = featurize_members(models, TASK, train, m=M, batch_size=4, progress=False)
    ref = EnsembleInfluence([sa.SketchedInfluence(featurizer=f) for f in full_feats]).fit(full).score(query)
    # a partial run: member 0 complete, member 1 stopped after a few rows, member 2 never started
    featurize_members(models[:1], TASK, train, m=M, batch_size=4, path=path, progress=False)
    feat1 = sa.Featurizer(models[1], TASK, projector="sjlt", m=M, seed=1, batch_size=4, progress=False)
    feat1.featurize(train, store="disk", path=path, checkpoint="member1", max_rows=8)
    assert len(DiskStore(path, checkpoint="member1")) == 8
    feats, stores = featurize_members(models, TASK, train, m=M, batch_size=4, path=path, progress=False)
    with h5py.File(path, "r") as f:
        assert {"member0", "member1", "member2"} <= set(f.keys())
    assert [len(s) for s in stores] == [30, 30, 30]
    assert all(torch.equal(a.rows().float(), b.rows()) for a, b in zip(full, stores))  # resumed = one run (float32 on disk)
    ens = EnsembleInfluence([sa.SketchedInfluence(featurizer=f) for f in feats]).fit(stores)
    assert torch.allclose(ens.score(query).double(), ref, atol=1e-4, rtol=1e-4)  # float32 rows on disk
    top = ens.score_to_hdf5(query, tmp_path / "scores.h5", k=3)
    with h5py.File(tmp_path / "scores.h5", "r") as f:
        assert f["scores"].shape == (5, 30)
        assert np.allclose(f["scores"][:], ens.score(query).numpy(), atol=1e-6)
    assert top.proponents.shape == (5, 3)


def test_refusals(setup):
    models, (x, y), query = setup
    feats, stores = featurize_members(models[:2], TASK, (x, y), m=M, progress=False)
    members = lambda: [sa.SketchedInfluence(featurizer=f) for f in feats]
    with pytest.raises(StoreMismatchError, match="member 0's store was not built"):  # stores swapped: another model's rows
        EnsembleInfluence(members()).fit(stores[::-1])
    other_seed = sa.Featurizer(models[1], TASK, projector="sjlt", m=M, seed=9, progress=False)
    with pytest.raises(StoreMismatchError, match="member 1"):  # a store of another sketch
        EnsembleInfluence(members()).fit([stores[0], other_seed.featurize((x, y))])
    fewer = feats[1].featurize((x, y), indices=list(range(20)))
    with pytest.raises(StoreMismatchError, match="other train rows"):
        EnsembleInfluence(members()).fit([stores[0], fewer])
    with pytest.raises(ValueError, match="2 stores for 3"):
        EnsembleInfluence(members() + members()[:1]).fit(stores)
    ens = EnsembleInfluence(members()).fit(stores)
    with pytest.raises(TypeError, match="one member's query rows"):
        ens.score(feats[0].query_rows(query))
    with pytest.raises(sa.QueryMismatchError):  # per-member rows given in the wrong order
        ens.score([feats[1].query_rows(query), feats[0].query_rows(query)])
    with pytest.raises(ValueError, match="weights"):
        EnsembleInfluence(members(), weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="normalize"):
        EnsembleInfluence(members(), normalize="z")
    with pytest.raises(RuntimeError, match="not fitted"):
        EnsembleInfluence(members()).score(query)


def test_distributed_two_ranks(setup, tmp_path):
    """2 gloo processes (tests/ensemble_worker.py): scores and top-k equal the one-process ensemble."""
    sys.path.insert(0, str(Path(__file__).parent))
    import ensemble_worker as W
    from launcher import run_ranks

    run_ranks([str(Path(W.__file__)), str(tmp_path)], 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models, train, query = W.build()
        feats, stores = featurize_members(models, TASK, train, m=W.M, batch_size=W.BATCH, progress=False)
        ens = EnsembleInfluence([sa.SketchedInfluence(featurizer=f) for f in feats], normalize="rms").fit(stores)
        ref, top = ens.score(query), ens.top_k(query, k=W.K)
    finally:
        torch.set_num_threads(threads)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.allclose(res["scores"], ref.to(res["scores"].dtype), atol=1e-5)
        assert torch.equal(res["proponents"], top.proponents) and torch.equal(res["opponents"], top.opponents)
        assert torch.equal(res["train_indices"], torch.as_tensor(ens.train_indices))

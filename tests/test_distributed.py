"""torch.distributed: 2 gloo processes on CPU against one process (tests/distributed_worker.py).

One 2-rank run (module fixture) covers featurization into joined HDF5 shards, F̂ (eigen and
Gram paths), scores, top-k, per-shard score files, EKFAC factors with sampled labels, DDP
models wrapped before and after the featurizer, resume per rank and a metadata mismatch
between ranks; the single-process side is computed here with the same settings.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import sketchattr as sa
import sketchattr.distributed as sad
from sketchattr.store import StoreMismatchError

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as W  # noqa: E402
from launcher import run_ranks  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Launch the 2 ranks like torchrun; return (output folder, [rank results])."""
    out = tmp_path_factory.mktemp("dist")
    run_ranks([str(Path(W.__file__)), str(out)], WORLD)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process results with the same settings (1 thread, like each rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("single")
        model, train, query = W.build()
        task = sa.ClassificationTask()
        feat = sa.Featurizer(model, task, projector="sjlt", m=W.M, seed=0, batch_size=W.BATCH, progress=False)
        store = feat.featurize(train, store=sa.DiskStore(out / "store.h5"))
        qrows = feat.query_rows(query)
        si = sa.SketchedInfluence().fit(store)
        nystrom = sa.SketchedInfluence(method="nystrom", rank=W.NYSTROM_RANK).fit(store)
        feat_id = sa.Featurizer(model, task, batch_size=W.BATCH, progress=False)
        id_store = feat_id.featurize(train)
        gram = sa.SketchedInfluence().fit(id_store)
        blocks = sa.SketchedInfluence(method="blocks").fit(id_store)
        factors = sa.fit_factors(model, task, train, kind="ekfac", fisher="true", batch_size=W.BATCH, progress=False)
        ekfac = sa.EKFACScorer(factors, feat).fit(store)
        feat_e = sa.Featurizer(model, task, projector=sa.EigenbasisProjector(W.EIGEN_M, factors), batch_size=W.BATCH, progress=False)
        eigen = sa.EKFACScorer(factors, feat_e).fit(feat_e.featurize(train, store=sa.DiskStore(out / "eigen.h5")))
        feat_s = sa.Featurizer(model, task, projector=sa.SparseEigenbasisProjector(W.EIGEN_M, factors), batch_size=W.BATCH, progress=False)
        topk = sa.EKFACScorer(factors, feat_s).fit(feat_s.featurize(train, store=sa.DiskStore(out / "topk.h5")))
        return dict(blocks=blocks, nystrom=nystrom, eigen_scores=eigen.score(query), eigen_topk_scores=topk.score(query), rows=store.rows(), indices=store.indices, si=si, qrows=qrows, gram=gram, gram_q=feat_id.query_rows(query),
                    factors=factors, ekfac_scores=ekfac.score(query), ekfac_top=ekfac.top_k(query, k=W.K), feat=feat,
                    train=train)
    finally:
        torch.set_num_threads(threads)


def _same_topk(res: dict, prefix: str, top, atol: float = 1e-10) -> None:
    assert np.array_equal(res[f"{prefix}_proponents"].numpy(), top.proponents)
    assert np.array_equal(res[f"{prefix}_opponents"].numpy(), top.opponents)
    assert np.allclose(res[f"{prefix}_proponent_scores"].numpy(), top.proponent_scores, atol=atol)
    assert np.allclose(res[f"{prefix}_opponent_scores"].numpy(), top.opponent_scores, atol=atol)


def test_joined_store_rows_bit_identical(run, single):
    out, results = run
    with h5py.File(out / "store.h5", "r") as f:  # plain h5py reads the joined file
        assert f["main/rows"].is_virtual
        rows, idx = f["main/rows"][:], f["main/indices"][:]
        assert f["main/written"][:].all()
    assert torch.equal(torch.from_numpy(rows), single["rows"]) and np.array_equal(idx, single["indices"])
    joined = sa.DiskStore(out / "store.h5")
    assert torch.equal(joined.rows(), single["rows"]) and joined.metadata == single["feat"].metadata()
    shards = [res["shard_indices"].numpy() for res in results]
    assert len(shards[0]) == 32 and np.array_equal(np.concatenate(shards), np.arange(W.N))  # 4 whole batches, then the rest
    with pytest.raises(PermissionError, match="read-only"):
        joined.prepare(single["feat"].metadata())


def test_fhat_scores_topk_match_single_process(run, single):
    _, results = run
    si, q = single["si"], single["qrows"]
    ref_scores, ref_top = si.score(q), si.top_k(q, k=W.K)
    for res in results:  # every rank holds the whole answer
        assert torch.allclose(res["sigma"], si.sigma, rtol=1e-10, atol=1e-12)
        assert res["damping"].item() == pytest.approx(si.damping_, rel=1e-10)
        assert res["scores"].shape == (W.NQ, W.N)
        assert torch.allclose(res["scores"], ref_scores, rtol=1e-5, atol=1e-6)  # float32 store: float32 products
        assert torch.allclose(res["self_influence"], si.self_influence(), rtol=1e-8)
        _same_topk(res, "top", ref_top)
        _same_topk(res, "h5top", ref_top)
    ny = single["nystrom"]  # rank-12 Nyström of a rank-32 F̂: passes summed over ranks give the same subspace
    for res in results:
        assert torch.allclose(res["nystrom_sigma"], ny.sigma, rtol=1e-5, atol=1e-9)  # float32 products, summed per rank
        assert torch.allclose(res["nystrom_scores"], ny.score(q), rtol=1e-4, atol=1e-6)
    for res in results:  # per-module blocks: per-block F̂ and λ summed over ranks
        assert torch.allclose(res["blocks_damping"], torch.tensor(single["blocks"].damping_), rtol=1e-10)
        assert torch.allclose(res["blocks_scores"], single["blocks"].score(single["gram_q"]), rtol=1e-8, atol=1e-10)
    assert results[0]["gram_path"].item()
    gram = single["gram"]
    assert gram.reproducible_dimension_ is not None  # damping="auto" measured split-half reproducibility
    for res in results:
        assert torch.allclose(res["gram_sigma"], gram.sigma, rtol=1e-10, atol=1e-12)
        assert torch.allclose(res["gram_scores"], gram.score(single["gram_q"]), rtol=1e-8, atol=1e-10)


def test_score_files_joined_per_shard(run, single):
    out, _ = run
    with h5py.File(out / "scores.h5", "r") as f:
        scores, idx = f["scores"][:], f["train_indices"][:]
    assert np.array_equal(idx, np.arange(W.N))
    ref = single["si"].score(single["qrows"]).float().numpy()
    assert np.allclose(scores, ref, rtol=1e-5, atol=1e-6)
    assert (out / "scores.rank1-of-2.h5").exists()


def test_ekfac_factors_and_scores_match(run, single):
    _, results = run
    factors = single["factors"]
    for res in results:
        for name, tensors in factors.tensors.items():
            for key, t in tensors.items():
                got = res[f"factors/{name}/{key}"]
                if key in ("QA", "QS"):  # eigenvectors up to sign: compare the projectors Q diag(λ) Qᵀ below
                    continue
                assert torch.allclose(got, t, rtol=1e-9, atol=1e-12), (name, key)
        assert torch.allclose(res["ekfac_scores"], single["ekfac_scores"], rtol=1e-6, atol=1e-9)
        _same_topk(res, "ekfac_top", single["ekfac_top"], atol=1e-8)
        assert torch.allclose(res["ddp_factors_lambda"], factors.tensors["2"]["Lambda"], rtol=1e-9, atol=1e-12)


def test_eigenbasis_sketch_on_shards_matches_single_process(run, single):
    _, res = run
    for r in range(WORLD):
        assert torch.allclose(res[r]["eigen_scores"], single["eigen_scores"], rtol=1e-6, atol=1e-9)
        assert torch.allclose(res[r]["eigen_topk_scores"], single["eigen_topk_scores"], rtol=1e-5, atol=1e-8)


def test_ddp_wrapped_before_or_after(run, single):
    _, results = run
    for res in results:
        assert res["ddp_same_metadata"].item()
    for key in ("ddp_before_rows", "ddp_after_rows"):
        joined = torch.cat([res[key] for res in results])
        assert torch.equal(joined.to(torch.float32), single["rows"]), key  # the disk store keeps float32


def test_resume_per_rank(run, single):
    _, results = run
    rows = results[0]["resumed_rows"]
    ref = single["rows"]
    assert torch.equal(rows[:32], ref[:32])  # rank 0: whole shard recomputed, bit-identical
    assert torch.equal(rows[32], torch.full((W.M,), 7.0, dtype=rows.dtype))  # flagged row kept, not recomputed
    assert torch.equal(rows[33:], ref[33:])  # unflagged rows recomputed


def test_metadata_mismatch_across_ranks_raises_on_every_rank(run):
    _, results = run
    for res in results:
        msg = bytes(res["mismatch_error"].tolist()).decode()
        assert "rank 1 sketches with other settings" in msg and "seed" in msg


def test_world_size_mismatch_and_missing_shard(run, single, tmp_path):
    out, _ = run
    with pytest.raises(StoreMismatchError, match="world size 1"):
        sad.featurize(single["feat"], single["train"], path=out / "store.h5")  # 2-process shards, 1 process now
    with pytest.raises(FileNotFoundError, match="rank1-of-2"):
        sad.join_store(tmp_path / "store.h5", 2)
    for f in out.glob("resume*.h5"):  # a joined store whose shard files were not moved with it
        f.rename(tmp_path / f.name)
    (tmp_path / "resume.rank0-of-2.h5").unlink()
    with pytest.raises(sa.StoreCorruptedError, match="rank0-of-2"):
        sa.DiskStore(tmp_path / "resume.h5")


def test_single_process_fallback(single, tmp_path):
    """Without torch.distributed everything runs as one process: same rows, one shard file."""
    feat, train = single["feat"], single["train"]
    shard = sad.featurize(feat, train, path=tmp_path / "s.h5")
    assert torch.equal(shard.rows(), single["rows"]) and torch.equal(sa.DiskStore(tmp_path / "s.h5").rows(), single["rows"])
    si = sa.SketchedInfluence().fit(shard, collective=sad.get_collective())
    assert torch.allclose(si.sigma, single["si"].sigma)
    with pytest.raises(RuntimeError, match="not initialised"):
        sad.TorchCollective()


def test_shards_are_batch_aligned_and_cover_everything():
    class Rank(sad.LocalCollective):
        def __init__(self, rank: int, world: int) -> None:
            self.rank, self.world_size = rank, world

    for n, bs, world in [(60, 8, 2), (5, 8, 3), (100, 1, 7), (64, 16, 4)]:
        parts = [Rank(r, world).shard(n, bs) for r in range(world)]
        assert parts[0].start == 0 and parts[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert all(p.start % bs == 0 for p in parts)


def test_unwrap_and_prefixed_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    wrapped = nn.DataParallel(model)  # same public .module as DistributedDataParallel
    assert sad.unwrap_model(wrapped) is model
    assert sa.model_fingerprint(wrapped) == sa.model_fingerprint(model)
    assert sa.select_modules(wrapped, ["module.1"]).names == ("1",)


@pytest.mark.parametrize("mode", ["die", "raise"])
def test_a_dead_rank_is_named_and_the_others_stop_promptly(mode):
    """Rank 1 dies (os._exit) or raises while rank 0 waits in an all-reduce: rank 0 stops within a few
    seconds (not the process group's 30-minute timeout) with an error naming rank 1 and what it was doing."""
    import subprocess
    import time

    from launcher import ROOT, free_port

    port = free_port()
    procs = []
    t0 = time.monotonic()
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).parent / "rank_failure_worker.py"), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    elapsed = time.monotonic() - t0
    assert procs[0].returncode != 0 and "rank 0 finished" not in logs[0]
    assert elapsed < 40, elapsed
    if mode == "die":
        assert re.search(r"rank 1 stopped responding [\d.]+ s ago \(last seen doing: featurize: batch 3 of 10\)", logs[0]), logs[0]
    else:
        assert "rank 1 failed with ValueError: out of memory in batch 4 (simulated) (while featurize: batch 3 of 10)" in logs[0], logs[0]


def test_plain_featurize_into_a_rank_shard_is_refused(tmp_path):
    """A rank's shard file belongs to its distributed run: a single-process Featurizer.featurize into it
    (which would plan every row there and damage the join) is refused at once, saying what to do; the
    shard and the joined store stay as they were, and the distributed run still resumes."""
    from conftest import tiny_data, tiny_mlp

    class Rank(sad.LocalCollective):  # the two ranks of a 2-process run, played one after the other
        def __init__(self, rank: int) -> None:
            self.rank, self.world_size = rank, 2

    train = tiny_data(n=24)
    feat = sa.Featurizer(tiny_mlp(), sa.ClassificationTask(), projector="sjlt", m=8, seed=0, batch_size=4, progress=False)
    path = tmp_path / "store.h5"
    for rank in (1, 0):  # rank 0 joins once rank 1's shard exists
        sad.featurize(feat, train, path=path, collective=Rank(rank))
    joined = sa.DiskStore(path).rows()
    shard = sad.shard_path(path, 1, 2)
    before = shard.read_bytes()
    msg = (r"store\.rank1-of-2\.h5 is rank 1's shard of a 2-process distributed featurization.*"
           r"sketchattr\.distributed\.featurize with the same collective \(world size 2\).*join")
    with pytest.raises(StoreMismatchError, match=msg):
        feat.featurize(train, store=sa.DiskStore(shard))
    with pytest.raises(StoreMismatchError, match=msg):
        feat.featurize(train, store=sa.DiskStore(shard), overwrite=True)
    assert shard.read_bytes() == before
    assert torch.equal(sa.DiskStore(path).rows(), joined) and torch.equal(joined, feat.train_rows(train).float())
    with h5py.File(shard, "a") as f:  # kept since the first run (creating the store used to drop it) ...
        assert json.loads(f.attrs["shard"])["rank"] == 1
        del f.attrs["shard"]  # ... shards of older runs lack it: the joined store listing them tells
    with pytest.raises(StoreMismatchError, match=msg):
        feat.featurize(train, store=sa.DiskStore(shard))
    for rank in (1, 0):
        assert len(sad.featurize(feat, train, path=path, collective=Rank(rank))) == 12

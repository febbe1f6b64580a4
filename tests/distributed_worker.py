"""One rank of the 2-process gloo run of tests/test_distributed.py (launched like torchrun:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment; argv[1] = output folder).

Writes ``rank<r>.pt`` (tensors only, read back with ``weights_only=True``) for the test to
compare against a single-process run of the same :func:`build` and settings.
"""
from __future__ import annotations

import copy
import sys
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

N, NQ, D_IN, HIDDEN, CLASSES, BATCH, M, K = 72, 6, 8, 16, 4, 8, 32, 5
EIGEN_M = 40
NYSTROM_RANK = 12


def build() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Tiny float64 MLP, N train rows, NQ query rows (same on every process)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N + NQ, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N + NQ,), generator=g)
    return model, (x[:N], y[:N]), (x[N:], y[N:])


def topk_tensors(prefix: str, top) -> dict[str, torch.Tensor]:
    return {f"{prefix}_{k}": torch.as_tensor(np.asarray(getattr(top, k))) for k in ("proponents", "proponent_scores", "opponents", "opponent_scores")}


def main(out: Path) -> None:
    import sketchattr as sa
    import sketchattr.distributed as sad
    from sketchattr.store import StoreMismatchError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    c = sad.get_collective()
    r = c.rank
    model, train, query = build()
    task = sa.ClassificationTask()
    res: dict[str, torch.Tensor] = {}

    # 1. featurize: per-rank shard files joined into store.h5
    feat = sa.Featurizer(model, task, projector="sjlt", m=M, seed=0, batch_size=BATCH, progress=False)
    path = out / "store.h5"
    shard = sad.featurize(feat, train, path=path)
    res["shard_indices"] = torch.as_tensor(shard.indices)
    qrows = feat.query_rows(query)

    # 2. sketched influence (eigen path), scores, top-k, self-influence, per-shard score files
    si = sa.SketchedInfluence().fit(shard, collective=c)
    res.update(sigma=si.sigma, damping=torch.tensor(si.damping_, dtype=torch.float64), scores=si.score(qrows), self_influence=si.self_influence())
    res.update(topk_tensors("top", si.top_k(qrows, k=K)))
    res.update(topk_tensors("h5top", si.score_to_hdf5(qrows, out / "scores.h5", k=K)))

    # 2b. Nyström path on the same shards (rank below m: passes summed over ranks)
    ny = sa.SketchedInfluence(method="nystrom", rank=NYSTROM_RANK).fit(shard, collective=c)
    res.update(nystrom_sigma=ny.sigma, nystrom_scores=ny.score(qrows))

    # 3. Gram path (identity projector, d > n) on in-memory shards
    feat_id = sa.Featurizer(model, task, batch_size=BATCH, progress=False)
    id_shard = sad.featurize(feat_id, train)
    gram = sa.SketchedInfluence().fit(id_shard, collective=c)
    blocks = sa.SketchedInfluence(method="blocks").fit(id_shard, collective=c)
    res.update(blocks_damping=torch.tensor(blocks.damping_), blocks_scores=blocks.score(feat_id.query_rows(query)))
    res.update(gram_path=torch.tensor(gram.path == "gram"), gram_sigma=gram.sigma, gram_scores=gram.score(feat_id.query_rows(query)))

    # 4. EKFAC factors (true Fisher: sampled labels) and EKFAC scores on the shard
    factors = sa.fit_factors(model, task, train, kind="ekfac", fisher="true", batch_size=BATCH, path=out / "factors", collective=c, progress=False)
    for name, tensors in factors.tensors.items():
        for key, t in tensors.items():
            res[f"factors/{name}/{key}"] = t
    ekfac = sa.EKFACScorer(factors, feat).fit(shard, collective=c)
    res["ekfac_scores"] = ekfac.score(query)
    res.update(topk_tensors("ekfac_top", ekfac.top_k(query, k=K)))
    # 4b. the eigenbasis sketch (kept EKFAC coordinates) on a sharded disk store, scored with EKFAC
    feat_e = sa.Featurizer(model, task, projector=sa.EigenbasisProjector(EIGEN_M, factors), batch_size=BATCH, progress=False)
    eig_shard = sad.featurize(feat_e, train, path=out / "eigen.h5")
    res["eigen_scores"] = sa.EKFACScorer(factors, feat_e).fit(eig_shard, collective=c).score(query)
    feat_s = sa.Featurizer(model, task, projector=sa.SparseEigenbasisProjector(EIGEN_M, factors), batch_size=BATCH, progress=False)
    res["eigen_topk_scores"] = sa.EKFACScorer(factors, feat_s).fit(sad.featurize(feat_s, train, path=out / "topk.h5"), collective=c).score(query)

    # 5. DDP: wrapped before creating the featurizer (prefixed names) and after
    before = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    feat_b = sa.Featurizer(before, task, modules=["module.0", "module.2"], projector="sjlt", m=M, seed=0, batch_size=BATCH, progress=False)
    res["ddp_before_rows"] = sad.featurize(feat_b, train).rows()
    inner = copy.deepcopy(model)
    feat_a = sa.Featurizer(inner, task, modules=["0", "2"], projector="sjlt", m=M, seed=0, batch_size=BATCH, progress=False)
    after = nn.parallel.DistributedDataParallel(inner)
    res["ddp_after_rows"] = sad.featurize(feat_a, train).rows()
    res["ddp_same_metadata"] = torch.tensor(feat_b.metadata() == feat_a.metadata() == feat.metadata())
    ddp_factors = sa.fit_factors(before, task, train, kind="ekfac", fisher="true", batch_size=BATCH, collective=c, progress=False)
    res["ddp_factors_lambda"] = ddp_factors.tensors["2"]["Lambda"]
    for wrapped in (before, after):  # the DDP models still train (no pending reduction left behind)
        wrapped(train[0]).sum().backward()

    # 6. resume per rank: rank 0 lost its file; rank 1 lost its last 3 flags (row 0 marked by a sentinel)
    path = out / "resume.h5"
    sad.featurize(feat, train, path=path)
    mine = sad.shard_path(path, r, c.world_size)
    if r == 0:
        mine.unlink()
    else:
        with h5py.File(mine, "a") as f:
            f["main/written"][-3:] = False
            f["main/rows"][0] = np.full(M, 7.0, dtype=np.float32)
    c.barrier()
    sad.featurize(feat, train, path=path)
    with h5py.File(path, "r") as f:
        res["resumed_rows"] = torch.from_numpy(f["main/rows"][:])

    # 7. an error raised on every rank: rank 1 sketches with another projector seed
    bad = sa.Featurizer(model, task, projector="sjlt", m=M, seed=r, batch_size=BATCH, progress=False)
    try:
        sad.featurize(bad, train, path=out / "bad.h5")
    except StoreMismatchError as exc:
        res["mismatch_error"] = torch.tensor(list(str(exc).encode()), dtype=torch.uint8)
    dist.barrier()  # no rank tears gloo down while a peer's last collective is in flight
    dist.destroy_process_group()
    torch.save(res, out / f"rank{r}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

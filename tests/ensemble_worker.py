"""One rank of the 2-process gloo run of tests/test_ensemble.py (launched like torchrun by
tests/launcher.py; argv[1] = output folder). Featurizes every member's shard into one HDF5 file
(a group per member), fits the ensemble across the ranks and writes ``rank<r>.pt``."""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

N, NQ, D_IN, HIDDEN, CLASSES, BATCH, M, K, MEMBERS = 40, 5, 6, 8, 3, 5, 10, 4, 3


def build() -> tuple[list[nn.Module], tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """MEMBERS tiny float64 MLPs (seeds 0..), N train rows, NQ queries (the same on every process)."""
    models = []
    for s in range(MEMBERS):
        torch.manual_seed(s)
        models.append(nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N + NQ, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N + NQ,), generator=g)
    return models, (x[:N], y[:N]), (x[N:], y[N:])


def main(out: Path) -> None:
    import sketchattr as sa
    import sketchattr.distributed as sad
    from sketchattr.score.ensemble import EnsembleInfluence, featurize_members

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    c = sad.get_collective()
    models, train, query = build()
    feats, shards = featurize_members(models, sa.ClassificationTask(), train, m=M, batch_size=BATCH, path=out / "ens.h5",
                                      collective=c, progress=False)
    ens = EnsembleInfluence([sa.SketchedInfluence(featurizer=f) for f in feats], normalize="rms").fit(shards, collective=c)
    top = ens.top_k(query, k=K)
    res = {"scores": ens.score(query), "proponents": top.proponents, "opponents": top.opponents,
           "train_indices": torch.as_tensor(ens.train_indices)}
    torch.save(res, out / f"rank{c.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

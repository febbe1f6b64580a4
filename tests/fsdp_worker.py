"""One rank of the 2-process gloo runs of tests/test_fsdp.py: every stage on a tiny HF model wrapped
with ``fully_shard`` per block and at the root, or with DistributedDataParallel (launched like
torchrun; argv: model name ``gpt2``/``llama``, comma-separated wrappings — ``fsdp``/``fsdp_keep``
(reshard_after_forward True/False), ``ddp``, ``hsdp``, ``refusals`` — and the output folder).

Writes ``<wrapping>/rank<r>.pt`` (tensors only) and joined stores ``<wrapping>/<projector>.h5``, and
``plain/rank<r>.pt``: the same model unwrapped on the same ranks.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from padded_lm import PaddedLMTask, padded_tokens, tiny_hf  # noqa: E402

N, NQ, LENGTH, BATCH = 13, 3, 16, 3  # 5 batches: 2 on rank 0, 3 on rank 1 (lockstep)
PROJECTORS = {  # name -> (projector, m)
    "identity": ("identity", None),
    "sjlt": ("sjlt", 32),
    "gaussian": ("gaussian", 16),
    "factorized": ("factorized", 16),
    "factgrass": ("factgrass", 32),
    "tensorsketch": ("tensorsketch", 64),
}
EIGEN_M = 48


def data() -> tuple[list[dict], list[dict]]:
    """N right-padded train sequences (variable lengths: the attention mask matters) and NQ queries."""
    return padded_tokens(N, LENGTH, seed=1), padded_tokens(NQ, LENGTH, seed=9)


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def wrapped(name: str, wrapping: str, seed: int = 0) -> nn.Module:
    """The tiny model, ``fully_shard``-ed per block and at the root (``fsdp``: resharded after each
    forward, ``fsdp_keep``: kept gathered until the backward; ``hsdp``: on a 2 × (world/2) mesh,
    sharded within each half and replicated across them), or DistributedDataParallel (``ddp``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_hf(name, seed=seed)
    if wrapping == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    mesh = None
    if wrapping == "hsdp":
        mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    for block in blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=wrapping != "fsdp_keep")
    fully_shard(model, mesh=mesh, reshard_after_forward=wrapping != "fsdp_keep")
    return model


def stages(model: nn.Module, model2: nn.Module, out: Path, collective) -> dict[str, torch.Tensor]:
    """Every stage on ``model`` (sharded or not; ``collective`` shards the rows), results by name."""
    import sketchattr as sa
    import sketchattr.distributed as sad

    task, (train, queries) = PaddedLMTask(), data()
    res: dict[str, torch.Tensor] = {}
    shards = {}
    for key, (projector, m) in PROJECTORS.items():
        feat = sa.Featurizer(model, task, projector=projector, m=m, seed=0, batch_size=BATCH, progress=False, engine="hooks")
        shards[key] = (feat, sad.featurize(feat, train, path=out / f"{key}.h5", collective=collective))
    factors = sa.fit_factors(model, task, train, kind="ekfac", batch_size=BATCH, collective=collective, progress=False)
    for name, tensors in factors.tensors.items():  # the well-defined parts: covariances and their spectra, a flat
        for k, v in tensors.items():             # block's Λ (eigenbases of repeated eigenvalues are arbitrary)
            if k in ("A", "S", "LA", "LS") or (k == "Lambda" and "QA" not in tensors and "QS" not in tensors):
                res[f"factors/{name}/{k}"] = v
    feat, shard = shards["identity"]
    res["ekfac"] = sa.EKFACScorer(factors, feat).fit(shard, collective=collective).score(queries)
    feat, shard = shards["sjlt"]
    res["sketched_influence"] = sa.SketchedInfluence().fit(shard, collective=collective).score(feat.query_rows(queries))
    eig = sa.Featurizer(model, task, projector=sa.SparseEigenbasisProjector(EIGEN_M, factors), batch_size=BATCH, progress=False)
    eig_shard = sad.featurize(eig, train, path=out / "eigen.h5", collective=collective)
    res["ekfac_sparse_eigenbasis"] = sa.EKFACScorer(factors, eig).fit(eig_shard, collective=collective).score(queries)
    tracin = sa.tracin_from_checkpoints([model, model2], task, train, learning_rates=[0.1, 0.2], projector="sjlt", m=32,
                                        batch_size=BATCH, progress=False)
    res["tracin"] = tracin.score(queries)
    return res


def train_time_rows(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """One SGD step of this rank's batch, sketched by TrainTimeSketcher from the step's own backward."""
    import sketchattr as sa

    task, (train, _) = PaddedLMTask(), data()
    batch = torch.utils.data.default_collate(train[rank * BATCH:(rank + 1) * BATCH])
    idx = torch.arange(rank * BATCH, (rank + 1) * BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sketcher = sa.TrainTimeSketcher(model, task, projector="sjlt", m=32, seed=0)
    opt.zero_grad()
    with sketcher.step(batch, idx, epoch=0):
        task.train_loss(model, batch).backward()
    opt.step()
    sketcher.close()
    return {"train_time": sketcher.stores["epoch0"].rows()}


class Scale(nn.Module):
    """A module with a parameter and no layer rule (the vmap fallback would be needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def refusals(out: Path, rank: int) -> None:
    """What sketchattr refuses on sharded models, as ``refusals<r>.json`` {case: [type, message]},
    and a model with its blocks wrapped but not its root, which works (``mixed<r>.pt``)."""
    import json

    import sketchattr as sa
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    found = {}

    def attempt(case: str, fn) -> None:
        try:
            fn()
            found[case] = ["none", ""]
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            found[case] = [type(exc).__name__, str(exc)]

    model = wrapped("gpt2", "fsdp")
    train, _ = data()
    attempt("dtype", lambda: sa.Featurizer(model, PaddedLMTask(), projector="sjlt", m=8, dtype=torch.float32,
                                           progress=False).train_rows(train[:2]))
    no_rule = nn.Sequential(nn.Linear(4, 4).double(), Scale())
    fully_shard(no_rule)
    attempt("no_rule", lambda: sa.Featurizer(no_rule, sa.RegressionTask(), progress=False).train_rows(
        (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))))
    tp = nn.Sequential(nn.Linear(4, 4).double())
    tp[0].weight = nn.Parameter(distribute_tensor(tp[0].weight.detach(), init_device_mesh("cpu", (2,)), [Shard(1)]))
    attempt("tensor_parallel", lambda: sa.Featurizer(tp, sa.RegressionTask(), progress=False))
    attempt("ggn_products", lambda: sa.curvature.GGNProducts(model, PaddedLMTask(), train, sa.Featurizer(
        model, PaddedLMTask(), projector="sjlt", m=8, progress=False).selection()))
    (out / f"refusals{rank}.json").write_text(json.dumps(found))
    mixed = tiny_hf("gpt2")
    for block in blocks(mixed):
        fully_shard(block)
    feat = sa.Featurizer(mixed, PaddedLMTask(), projector="sjlt", m=32, seed=0, batch_size=BATCH, progress=False)
    torch.save({"rows": feat.train_rows(train[rank::2])}, out / f"mixed{rank}.pt")


def main(name: str, wrappings: list[str], out: Path) -> None:
    """Each of ``wrappings`` in turn (its results under ``out/<wrapping>/``), plus ``plain`` (the
    unwrapped model on the same ranks) when a wrapped stage run is asked for."""
    import sketchattr as sa
    import sketchattr.distributed as sad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    c = sad.get_collective()
    for wrapping in wrappings:
        folder = out / wrapping
        folder.mkdir(exist_ok=True)
        if wrapping == "refusals":
            refusals(folder, c.rank)
        elif wrapping == "hsdp":  # model x data parallel: every rank writes its own rows into its shard file
            model, (train, _) = wrapped(name, "hsdp"), data()
            for key in ("identity", "sjlt"):
                projector, m = PROJECTORS[key]
                feat = sa.Featurizer(model, PaddedLMTask(), projector=projector, m=m, seed=0, batch_size=BATCH, progress=False)
                sad.featurize(feat, train, path=folder / f"{key}.h5", collective=c)
        else:
            res = stages(wrapped(name, wrapping), wrapped(name, wrapping, seed=1), folder, c)
            res.update(train_time_rows(wrapped(name, wrapping), c.rank))
            torch.save(res, folder / f"rank{c.rank}.pt")
    if set(wrappings) - {"refusals", "hsdp"}:  # the same model unwrapped, the same ranks and rows: the same sums
        (out / "plain").mkdir(exist_ok=True)
        torch.save(stages(tiny_hf(name), tiny_hf(name, seed=1), out / "plain", c), out / "plain" / f"rank{c.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), Path(sys.argv[3]))

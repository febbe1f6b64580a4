"""One process of the two-"node" torchrun test (tests/test_fsdp.py): ``torchrun --nnodes 2
--nproc_per_node 1 --node_rank N`` on this machine, a tiny GPT-2 ``fully_shard``-ed across both.

argv: the shared folder. Both layouts in one job: ``shared`` (both nodes write into the shared
folder, rank 0 joins) and ``local`` (each node writes into its own folder, ``$NODE_DIR``, and nothing
is joined: the test copies the shards together and joins them).
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_worker import BATCH, data, wrapped  # noqa: E402
from padded_lm import PaddedLMTask  # noqa: E402


def main(folder: Path) -> None:
    import sketchattr as sa
    import sketchattr.distributed as sad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    c = sad.get_collective()
    model, (train, queries) = wrapped("gpt2", "fsdp"), data()
    feat = sa.Featurizer(model, PaddedLMTask(), projector="sjlt", m=32, seed=0, batch_size=BATCH, progress=False)
    for mode, where in (("shared", folder / "shared"), ("local", Path(os.environ["NODE_DIR"]))):
        where.mkdir(exist_ok=True)
        shard = sad.featurize(feat, train, path=where / "store.h5", collective=c, join=mode == "shared")
        scores = sa.SketchedInfluence().fit(shard, collective=c).score(feat.query_rows(queries))
        if c.rank == 0:
            torch.save({"scores": scores}, where / "scores.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

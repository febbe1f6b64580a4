"""Featurizing with 2 processes (torch.distributed, gloo) against 1: speedup and where the time goes.

The 1.33M-parameter MLP of store_throughput.py (784-1024-512-10) on random rows, vmap + SJLT,
into per-rank HDF5 shards joined by rank 0 (sketchattr.distributed.featurize). Each
configuration is P processes × T threads, launched like torchrun (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); default 1×1, 1×2 and 2×1 (the 2-process run has one thread per
rank, so 2×1 against 1×2 is processes against threads on the same cores).

    python benchmarks/distributed_featurize.py [--n 2048] [--m 1024] [--batch_size 64] [--configs 1x1 1x2 2x1]
    python benchmarks/distributed_featurize.py --quick      # 256 rows, 1x1 and 2x1

Rank 0 shows a progress bar over its shard (stderr); each configuration prints its row when done.

Stages per rank: gradients (per-example vmap gradients and data loading: what is left of the
shard's time), projection (SJLT), store write (HDF5 commits), barrier wait (for the slowest
rank), join (rank 0 writes the virtual-dataset file). rows/s = rows / the slowest rank's wall.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: featurize the shard, record the stage times, write them as JSON."""
    import torch.distributed as dist

    import sketchattr.distributed as sad
    from sketchattr import ClassificationTask, Featurizer
    from sketchattr.core.profiler import Profiler
    from sketchattr.store import DiskStore
    from store_throughput import synthetic_mlp

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    c = sad.get_collective()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(args.n, 784, generator=g), torch.randint(0, 10, (args.n,), generator=g))
    feat = Featurizer(synthetic_mlp(), ClassificationTask(), projector="sjlt", m=args.m, seed=0, batch_size=args.batch_size, progress=False)
    feat.train_rows(data, indices=range(args.batch_size))  # warm-up: projector streams, allocator
    feat.progress = c.is_main and not args.no_progress  # a bar over rank 0's shard (after the untimed warm-up)

    prof = Profiler(enabled=True)
    project, commit = feat.projector.project, DiskStore._commit

    def timed_project(*a, **k):
        with prof.record("projection"):
            return project(*a, **k)

    def timed_commit(self):
        with prof.record("store write"):
            return commit(self)

    feat.projector.project = timed_project
    DiskStore._commit = timed_commit
    c.barrier()
    t0 = time.perf_counter()
    shard = sad.featurize(feat, data, path=Path(args.out) / "store.h5", profiler=prof)
    wall = time.perf_counter() - t0
    total = lambda k: sum(prof.durations.get(k, []))
    stages = {
        "gradients": total("featurize shard") - total("projection") - total("store write"),
        "projection": total("projection"),
        "store write": total("store write"),
        "barrier wait": total("wait for ranks"),
        "join": total("join"),
    }
    result = {"rank": c.rank, "rows": len(shard), "wall": wall, "stages": stages}
    (Path(args.out) / f"rank{c.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(procs: int, threads: int, args: argparse.Namespace, out: Path) -> list[dict]:
    """Run ``procs`` ranks of this script (``threads`` each), return their results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--threads", str(threads),
           "--n", str(args.n), "--m", str(args.m), "--batch_size", str(args.batch_size)] + (["--no_progress"] if args.no_progress else [])
    running = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(procs)]
    if any(p.wait() for p in running):
        raise SystemExit(f"a rank of the {procs}x{threads} run failed")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="train rows")
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"], help="PROCESSESxTHREADS")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="256 rows, configurations 1x1 and 2x1 (a smoke run)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = ap.parse_args()
    if args.quick and not args.worker:
        args.n, args.configs = min(args.n, 256), ["1x1", "2x1"]
    if args.worker:
        return worker(args)

    stage_names = ["gradients", "projection", "store write", "barrier wait", "join"]
    head = f"{'procs x threads':>15} {'rows':>6} {'wall s':>7} {'rows/s':>7} {'speedup':>7} | " + " ".join(f"{s:>12}" for s in stage_names)
    print(f"featurize {args.n} rows of the 1.33M-parameter MLP, SJLT m={args.m}, batch {args.batch_size}, disk shards + join")
    print("stage columns: seconds on rank 0 / on the slowest other rank")
    print(head)
    print("-" * len(head))
    base = None
    for config in args.configs:
        procs, threads = (int(v) for v in config.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            results = launch(procs, threads, args, Path(tmp))
        wall = max(r["wall"] for r in results)
        rate = sum(r["rows"] for r in results) / wall
        base = base or rate
        cells = []
        for s in stage_names:
            first, rest = results[0]["stages"][s], [r["stages"][s] for r in results[1:]]
            cells.append(f"{first:.2f}" + (f" / {max(rest):.2f}" if rest else ""))
        print(f"{config:>15} {args.n:>6} {wall:>7.2f} {rate:>7.1f} {rate / base:>6.2f}x | " + " ".join(f"{c:>12}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

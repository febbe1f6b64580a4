"""Score 1,000 queries against a disk store larger than the memory budget.

Writes a synthetic HDF5 store of ≥ 2 GB of sketched rows (low-rank signal + noise, so F̂ has a
realistic decaying spectrum), fits SketchedInfluence block by block (F̂ accumulated from the
store, never the rows in memory), and streams the store again to score 1,000 queries with a
running top-k merge (optionally also writing the full score matrix to HDF5 in chunks). Prints
rows/s written and read and the peak RSS after each stage (bar: < 1 GB).

    python benchmarks/store_streaming.py [--gb 2.0] [--m 4096] [--queries 1000] [--scores_out FILE]
    python benchmarks/store_streaming.py --quick     # a 0.1 GB store, m = 1024, 100 queries

Writing the store shows a progress bar; each later stage prints a line when it starts and one when done.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sketchattr import SketchedInfluence
from sketchattr.score.queries import QueryRows
from sketchattr.store import DiskStore, StoreMetadata


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_rows(start: int, count: int, basis: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows [count, m]: Z·basis + 0.05·noise, reproducible per row range."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    z = torch.randn(count, basis.shape[0], generator=g)
    return z @ basis + 0.05 * torch.randn(count, basis.shape[1], generator=g)


def write_store(path: Path, n: int, m: int, basis: torch.Tensor) -> None:
    """Write n synthetic rows; time only the store's writes (row generation excluded)."""
    store = DiskStore(path)
    meta = StoreMetadata(projector={"type": "synthetic", "m": m, "seed": 0}, modules={}, model_fingerprint="synthetic", task="synthetic", dim=m)
    t_write, batch = 0.0, 4096
    with store.writing():
        store.prepare(meta, planned=np.arange(n))
        for s in tqdm(range(0, n, batch), desc="write store", unit="block"):
            c = min(batch, n - s)
            rows = synthetic_rows(s, c, basis, seed=0)
            t0 = time.perf_counter()
            store.write(np.arange(s, s + c), rows)
            t_write += time.perf_counter() - t0
        t0 = time.perf_counter()
    t_write += time.perf_counter() - t0  # the final commit
    size = path.stat().st_size
    print(f"write : {t_write:7.1f} s  {n / t_write:10,.0f} rows/s  {size / t_write / 2**20:7.0f} MB/s  "
          f"file {size / 2**30:.2f} GiB  peak RSS {peak_rss_mb():.0f} MB (store writes only; row generation excluded)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the sketched rows on disk (fp32)")
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rank", type=int, default=256, help="rank of the synthetic signal")
    ap.add_argument("--path", default="grad_cache/streaming_bench.h5")
    ap.add_argument("--block_mb", type=int, default=32, help="rows read per block (MB)")
    ap.add_argument("--scores_out", default=None, help="also write the full score matrix to this HDF5 file")
    ap.add_argument("--keep", action="store_true", help="keep the store file afterwards")
    ap.add_argument("--reuse", action="store_true", help="reuse a kept store file with the same row count")
    ap.add_argument("--quick", action="store_true", help="a 0.1 GB store, m = 1024, 100 queries (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.gb, args.m, args.queries = min(args.gb, 0.1), min(args.m, 1024), min(args.queries, 100)
    torch.set_num_threads(2)

    m = args.m
    n = int(args.gb * 2**30 // (4 * m))
    path = Path(args.path)
    basis = torch.randn(args.rank, m, generator=torch.Generator().manual_seed(7)) * torch.logspace(0, -2, args.rank)[:, None]
    print(f"store: {n:,} rows x m={m} fp32 = {n * m * 4 / 2**30:.2f} GiB at {path}; baseline peak RSS {peak_rss_mb():.0f} MB")
    if not (args.reuse and path.exists() and len(DiskStore(path)) == n):
        path.unlink(missing_ok=True)
        write_store(path, n, m, basis)

    store = DiskStore(path, block_bytes=args.block_mb * 2**20)  # reopen: nothing cached in memory
    print("fit   : streaming the store to accumulate F̂ ...", flush=True)
    t0 = time.perf_counter()
    scorer = SketchedInfluence(damping="auto").fit(store)
    t_fit = time.perf_counter() - t0
    print(f"fit   : {t_fit:7.1f} s  {n / t_fit:10,.0f} rows/s read (F̂ accumulated + eigh of {m}x{m}), "
          f"λ={scorer.damping_:.3g}, d_λ={scorer.effective_dimension():.0f}  peak RSS {peak_rss_mb():.0f} MB")

    queries = QueryRows.unchecked(synthetic_rows(10**9, args.queries, basis, seed=1))  # synthetic: no featurizer to check
    print(f"score : streaming the store against {args.queries} queries ...", flush=True)
    t0 = time.perf_counter()
    top = scorer.top_k(queries, k=args.k)
    t_score = time.perf_counter() - t0
    print(f"score : {t_score:7.1f} s  {n / t_score:10,.0f} rows/s read, {args.queries} queries, running top-{args.k}  "
          f"peak RSS {peak_rss_mb():.0f} MB")
    if args.scores_out:
        t0 = time.perf_counter()
        scorer.score_to_hdf5(queries, args.scores_out)
        t_out = time.perf_counter() - t0
        print(f"matrix: {t_out:7.1f} s  [{args.queries} x {n:,}] float32 written to {args.scores_out}  peak RSS {peak_rss_mb():.0f} MB")

    # spot check: the streamed top-1 of query 0 equals a direct score of that one row
    best = int(top.proponents[0, 0])
    row = next(rows[idx == best] for idx, rows in store.iter_blocks() if (idx == best).any())
    direct = float(-(scorer.precondition(queries[:1]) @ row.double().T))
    print(f"check : top-1 of query 0 is row {best}: streamed score {top.proponent_scores[0, 0]:.6g}, direct {direct:.6g}")
    print(f"peak RSS {peak_rss_mb():.0f} MB (bar < 1024 MB)")
    if not args.keep:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

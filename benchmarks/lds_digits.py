"""LDS and seconds of regularized sketched influence on the digits-mlp bench (docs/benchmarks.md).

For each projector and sketch size m: featurize the 1000 train rows and 100 queries, fit
SketchedInfluence with damping="auto", score, and compute LDS against the cached retraining
ground truth (built on first use, ~1 min). Beside it: the best λ of a log-grid on the same
sketch (needs ground truth: an oracle), the Kronfluence-style rule λ = 0.1·mean eigenvalue, and
a near-unregularized solve (λ = 1e-8·σ_max, what TRAK-style scorers do).

    python benchmarks/lds_digits.py                 # full table
    python benchmarks/lds_digits.py --quick         # m=1024 SJLT + exact only
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from sketchattr import ClassificationTask, Featurizer, SketchedInfluence
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.recipes import train_digits_mlp
from sketchattr.bench.ground_truth import digits_ground_truth
from sketchattr.validate.lds import lds

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def attribute(model, split, projector: str, m: int | None, seed: int):
    """The timed path: featurize train + queries, fit, score with auto damping."""
    t0 = time.perf_counter()
    feat = Featurizer(model, ClassificationTask(), projector=projector, m=m, seed=seed, batch_size=250, progress=False)
    store = feat.featurize(split.train_dataset())
    queries = feat.query_rows(split.query_dataset())
    scorer = SketchedInfluence(damping="auto").fit(store)
    scores = scorer.score(queries)
    return time.perf_counter() - t0, scorer, queries, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="256,1024,4096")
    ap.add_argument("--projectors", default="sjlt,gaussian")
    ap.add_argument("--seed", type=int, default=0, help="projector seed")
    ap.add_argument("--model_seed", type=int, default=0, help="training seed of the attributed model (bench: 0)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median quoted)")
    ap.add_argument("--cache_dir", default="grad_cache")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    ms = [1024] if args.quick else [int(m) for m in args.ms.split(",")]
    projectors = ["sjlt"] if args.quick else args.projectors.split(",")

    split = load_digits_split()
    gt = digits_ground_truth(cache_dir=args.cache_dir)
    model = train_digits_mlp(seed=args.model_seed, split=split)

    def lds_of(scores: torch.Tensor) -> float:
        return lds(scores.cpu().numpy(), gt.masks, gt.outputs).mean

    configs = [(p, m) for p in projectors for m in ms] + [("identity", None)]
    header = (f"{'projector':<10} {'m':>5} {'auto λ/σmax':>11} {'d_λ':>6} {'m/d_λ':>6} {'LDS auto':>8} "
              f"{'best grid':>9} {'@λ/σmax':>7} {'gap':>6} {'kronf.':>6} {'unreg.':>6} {'sec (median)':>12}")
    print(header)
    print("-" * len(header))
    for projector, m in tqdm(configs, desc="projectors", unit="config"):
        times = []
        for _ in range(args.repeats):
            sec, scorer, queries, scores = attribute(model, split, projector, m, args.seed)
            times.append(sec)
        auto = lds_of(scores)
        smax = scorer.sigma_max
        grid = scorer.score_grid(queries, [r * smax for r in GRID])
        grid_lds = [lds_of(s) for s in grid]
        best = int(np.argmax(grid_lds))
        kronf = lds_of(scorer.score(queries, damping=0.1 * float(scorer.sigma.sum()) / scorer.dim))
        unreg = lds_of(scorer.score(queries, damping=1e-8 * smax))
        d_lam = scorer.effective_dimension()
        tqdm.write(f"{projector:<10} {scorer.dim:>5} {scorer.damping_ / smax:>11.2e} {d_lam:>6.0f} {scorer.dim / d_lam:>6.1f} "
              f"{auto:>8.3f} {grid_lds[best]:>9.3f} {GRID[best]:>7.0e} {grid_lds[best] - auto:>6.3f} {kronf:>6.3f} "
              f"{unreg:>6.3f} {statistics.median(times):>12.2f}")
        tqdm.write(f"{'':<10} grid LDS over λ/σmax {GRID}: " + ", ".join(f"{v:.3f}" for v in grid_lds))


if __name__ == "__main__":
    main()

"""Leave-one-out correlation on digits-mlp: a second yardstick beside LDS.

Retrains the bench model without each of the first --n_removed train rows (seeds shared with the
full runs), then prints the mean per-query Spearman correlation between scores[q, i] and the
measured effect f(all) − f(all∖i), for the exact and sketched regularized IF and a TracIn-like
gradient dot product (λ → ∞ limit, up to scale).

    python benchmarks/loo_digits.py [--n_removed 50] [--n_seeds 4]
    python benchmarks/loo_digits.py --quick         # 10 removed rows, 1 seed (its own cache file)

The retrainings (cached and resumable under --cache_dir) show a progress bar.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np

from sketchattr import ClassificationTask, Featurizer, SketchedInfluence
from sketchattr.bench.data.digits import N_TRAIN, load_digits_split
from sketchattr.bench.recipes import query_margins, train_digits_mlp
from sketchattr.validate import loo_correlation, loo_ground_truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_removed", type=int, default=50)
    ap.add_argument("--n_seeds", type=int, default=4)
    ap.add_argument("--cache_dir", default="grad_cache")
    ap.add_argument("--quick", action="store_true", help="10 removed rows and 1 seed (a smoke run; the correlation is noisy)")
    args = ap.parse_args()
    if args.quick:
        args.n_removed, args.n_seeds = min(args.n_removed, 10), 1
    split = load_digits_split()
    truth = loo_ground_truth(Path(args.cache_dir) / f"digits_loo_{args.n_removed}_R{args.n_seeds}.h5",
                             partial(train_digits_mlp, split=split), partial(query_margins, split=split),
                             n_train=N_TRAIN, removed=np.arange(args.n_removed), n_seeds=args.n_seeds, workers=2)
    model = train_digits_mlp(seed=0, split=split)
    print(f"LOO effects: mean |Δ| {np.abs(truth.delta).mean():.4f}, removed {len(truth.removed)} rows, {args.n_seeds} shared seeds")
    for projector, m in (("identity", None), ("sjlt", 1024)):
        feat = Featurizer(model, ClassificationTask(), projector=projector, m=m, batch_size=250, progress=False)
        scorer = SketchedInfluence().fit(feat.featurize(split.train_dataset()))
        queries = feat.query_rows(split.query_dataset())
        name = "exact" if m is None else f"{projector} m={m}"
        print(f"{name:<14} auto λ: LOO correlation {loo_correlation(scorer.score(queries).numpy(), truth)[0]:.3f}")
        if m is None:
            grad_dot = -(queries.double() @ scorer.store.rows().double().T).numpy()
            print(f"{'grad-dot':<14}        LOO correlation {loo_correlation(grad_dot, truth)[0]:.3f}")


if __name__ == "__main__":
    main()

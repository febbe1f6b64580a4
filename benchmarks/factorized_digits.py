"""Factorized (Kronecker) sketch against dense sketches of equal width on digits-mlp: LDS with
damping="auto" and featurization seconds (median of --repeats).

    python benchmarks/factorized_digits.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import sketchattr as sa
from sketchattr.data.digits import load_digits_split
from sketchattr.recipes import train_digits_mlp
from sketchattr.validate.ground_truth import digits_ground_truth
from sketchattr.validate.lds import lds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    split = load_digits_split()
    gt = digits_ground_truth()
    model = train_digits_mlp(seed=0, split=split)
    print(f"{'sketch':<26} {'m':>5} {'LDS auto':>8} {'featurize s':>11}")
    for side in (16, 32):
        m = 2 * side * side  # two Linear modules, rows concatenated
        for label, projector, kw in ((f"factorized {side}x{side} per module", sa.FactorizedProjector(side, side, seed=0), {}),
                                     ("sjlt (dense path)", "sjlt", {"m": m}), ("gaussian (dense path)", "gaussian", {"m": m})):
            feat = sa.Featurizer(model, sa.ClassificationTask(), projector=projector, seed=0, batch_size=250, progress=False, **kw)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                store = feat.featurize(split.train_dataset())
                times.append(time.perf_counter() - t0)
            scores = sa.SketchedInfluence().fit(store).score(feat.query_rows(split.query_dataset()))
            print(f"{label:<26} {store.dim:>5} {lds(scores.numpy(), gt).mean:>8.3f} {statistics.median(times):>11.3f}")


if __name__ == "__main__":
    main()

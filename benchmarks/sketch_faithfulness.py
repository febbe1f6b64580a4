"""How faithful is each sketch on digits-mlp, at equal m and in half precision?

Part 1 — sketch types at equal width m: factorized (LoGra-style Kronecker, two 16×16 or 32×32
modules concatenated), FactGraSS-style (mask → Kronecker → SJLT), and the dense SJLT and Gaussian
sketches. Part 2 — precision: gradients computed *and* stored in fp32, bf16 or fp16 (the
Featurizer's ``dtype``; the factorized path runs a bf16/fp16 copy of the model), for SJLT
m = 1024 and factorized 32×32.

Columns: LDS with ``damping="auto"`` (100 queries, cached ground truth); ε₉₅ and pairwise ε₉₅ of
the regularized quadratic/bilinear forms on the 100 query gradients against the exact
(unsketched, fp32) forms at λ = the exact scorer's auto λ (see sketchattr.validate.spectrum); and
featurization seconds for the 1,000 train rows (median of --repeats).

    python benchmarks/sketch_faithfulness.py [--repeats 3]
    python benchmarks/sketch_faithfulness.py --quick    # one repeat, 16×16-sized sketches, SJLT in fp32/bf16

A progress bar (stderr) counts the sketches measured.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.recipes import train_digits_mlp
from sketchattr.bench.ground_truth import digits_ground_truth
from sketchattr.validate.lds import lds
from sketchattr.validate.spectrum import spectrum_check

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(model, split, gt, exact, exact_q, lam, projector, m, dtype, repeats):
    """(LDS, ε95, pairwise ε95, featurize seconds, m) of one sketch computed and stored in ``dtype``."""
    factor_path = isinstance(sa.make_projector(projector, m=m), sa.FactorizedProjector)
    net = copy.deepcopy(model).to(dtype) if factor_path else model  # the hook path runs the model itself
    feat = sa.Featurizer(net, sa.ClassificationTask(), projector=projector, m=m, seed=0, batch_size=250,
                         dtype=dtype, progress=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        store = feat.featurize(split.train_dataset(), store=sa.MemoryStore(dtype=dtype))
        times.append(time.perf_counter() - t0)
    q = feat.query_rows(split.query_dataset())
    scorer = sa.SketchedInfluence().fit(store)
    check = spectrum_check(exact, exact_q, scorer, q.double(), lam)
    return lds(scorer.score(q).float().numpy(), gt).mean, check.epsilon_95, check.pairwise_epsilon_95, statistics.median(times), store.dim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat, the 16×16-sized sketches of part 1, SJLT in fp32 and bf16 in part 2")
    args = ap.parse_args()
    sides = (16,) if args.quick else (16, 32)
    part2 = (("sjlt", "sjlt", 1024),) if args.quick else (("sjlt", "sjlt", 1024), ("factorized 32x32 per module", "factorized", 1024))
    dtypes = {k: DTYPES[k] for k in (("fp32", "bf16") if args.quick else DTYPES)}
    if args.quick:
        args.repeats = 1
    split = load_digits_split()
    gt = digits_ground_truth()
    model = train_digits_mlp(seed=0, split=split)
    ident = sa.Featurizer(model, sa.ClassificationTask(), projector="identity", batch_size=250, progress=False)
    exact = sa.SketchedInfluence().fit(ident.featurize(split.train_dataset()))
    exact_q = ident.query_rows(split.query_dataset()).double()
    lam = exact.damping_
    print(f"exact: LDS {lds(exact.score(exact_q).numpy(), gt).mean:.3f}; ε₉₅ measured at λ = {lam:.3g} "
          f"({lam / exact.sigma_max:.1e}·σ_max), d_λ = {exact.effective_dimension():.0f}\n")

    header = f"{'sketch':<34} {'m':>5} {'dtype':>5} {'LDS auto':>8} {'ε95':>6} {'pair ε95':>8} {'featurize s':>11}"
    print("Part 1 — sketch types at equal m (fp32)\n" + header, flush=True)
    bar = tqdm(total=4 * len(sides) + len(part2) * len(dtypes), desc="sketches", unit="sketch")
    for side in sides:
        m = 2 * side * side  # two Linear modules, concatenated
        cases = ((f"factorized {side}x{side} per module", "factorized", side * side),
                 ("factgrass (mask 4m → SJLT)", "factgrass", m), ("sjlt", "sjlt", m), ("gaussian", "gaussian", m))
        for label, proj, size in cases:
            r = measure(model, split, gt, exact, exact_q, lam, proj, size, torch.float32, args.repeats)
            bar.update()
            tqdm.write(f"{label:<34} {r[4]:>5} {'fp32':>5} {r[0]:>8.3f} {r[1]:>6.3f} {r[2]:>8.3f} {r[3]:>11.3f}")
    tqdm.write("\nPart 2 — half precision, computed and stored\n" + header)
    for label, proj, size in part2:
        for name, dtype in dtypes.items():
            r = measure(model, split, gt, exact, exact_q, lam, proj, size, dtype, args.repeats)
            bar.update()
            tqdm.write(f"{label:<34} {r[4]:>5} {name:>5} {r[0]:>8.3f} {r[1]:>6.3f} {r[2]:>8.3f} {r[3]:>11.3f}")
    bar.close()


if __name__ == "__main__":
    main()

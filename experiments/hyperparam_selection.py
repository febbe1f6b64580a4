"""Choosing (m, λ): theory-driven against utility-driven, on a λ × m grid of LDS.

* Utility-driven: λ* and m* maximise LDS on the *validation* queries over the grid; then check
  m* ≥ d_λ* (is the chosen sketch even large enough for that λ?).
* Theory-driven (no ground truth): λ from ``damping="auto"`` on the exact Fisher, d_λ at that λ,
  m = recommend_sketch_size(d_λ, ε).
Both are scored on the held-out *test* queries and compared with the grid's best test LDS.
The test split of the dataset is divided into validation and test queries by a seeded permutation.

    python experiments/hyperparam_selection.py            # digits-mlp, all three projectors
    python experiments/hyperparam_selection.py --quick    # CI

Outputs: <output_dir>/hyperparam_selection_<dataset>_<model>.{json,csv,png}.
"""
from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

import _common as C
from sketchattr import SketchedInfluence
from sketchattr.bench.models.registry import make_model
from sketchattr.score.damping import auto_damping, effective_dimension
from sketchattr.bench.train import train_model
from sketchattr.validate.ground_truth import subset_ground_truth
from sketchattr.bench.ground_truth import digits_ground_truth
from sketchattr.validate.lds import lds
from sketchattr.validate.spectrum import recommend_sketch_size


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap)
    ap.add_argument("--ms", default="128,256,512,1024,2048,4096", help="sketch sizes of the grid")
    ap.add_argument("--lambdas", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", help="λ / σ_max values of the grid")
    ap.add_argument("--epsilon", type=float, default=0.1, help="target ε of the theory-driven sketch size")
    ap.add_argument("--num_subsets", type=int, default=100, help="LDS subsets K")
    ap.add_argument("--alpha", type=float, default=0.5, help="LDS subset fraction")
    ap.add_argument("--n_seeds", type=int, default=2, help="training seeds per LDS subset")
    ap.add_argument("--val_fraction", type=float, default=0.5, help="share of test queries used for validation")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test = args.n_train or 200, args.n_test or 40
        args.ms, args.lambdas = "64,256", "1e-3,1e-2"
        args.num_subsets, args.n_seeds = 12, 1
    return args


def measurements(model: torch.nn.Module, dataset, task) -> torch.Tensor:
    """f(z) of every example of ``dataset`` under ``task``: [n]."""
    out = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = tuple(t.unsqueeze(0) for t in dataset[i])
            out.append(task.measurement(model, item if len(item) > 1 else item[0]))
    return torch.stack(out)


def ground_truth(args: argparse.Namespace, split):
    """LDS ground truth for the test split (the bench's cached one for full digits-mlp)."""
    if args.dataset == "digits" and args.model == "mlp" and len(split.train) == 1000 and len(split.test) == 100:
        return digits_ground_truth(cache_dir=args.cache_dir, n_subsets=args.num_subsets, alpha=args.alpha, n_seeds=args.n_seeds)
    task = C.task_for(split)
    train_fn = lambda pos, seed: train_model(make_model(args.model, split, seed=seed), split, seed=seed, subset=pos)
    path = Path(args.cache_dir) / (f"lds_{args.dataset}_{args.model}_n{len(split.train)}_q{len(split.test)}"
                                   f"_K{args.num_subsets}_a{args.alpha}_R{args.n_seeds}_s{args.seed}.h5")
    return subset_ground_truth(path, train_fn, partial(measurements, dataset=split.test, task=task), n_train=len(split.train),
                               n_subsets=args.num_subsets, alpha=args.alpha, n_seeds=args.n_seeds, seed=args.seed,
                               attrs={"dataset": args.dataset, "model": args.model}, progress=not args.quick, workers=2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    projs = C.proj_types(args.proj_type)
    split = C.load_split(args)
    model = C.trained_model(args, split)
    gt = ground_truth(args, split)
    perm = np.random.RandomState(args.seed).permutation(len(split.test))
    n_val = int(round(args.val_fraction * len(split.test)))
    val, test = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    def lds_on(scores: torch.Tensor, which: np.ndarray) -> float:
        return lds(scores[which].cpu().numpy(), gt.masks, gt.outputs[:, which]).mean

    grads = C.exact_gradients(args, model, split)
    exact = SketchedInfluence().fit(grads.train_store)
    lam_theory = auto_damping(exact.sigma, sum(grads.dims), exact.n_train)
    d_theory = effective_dimension(exact._sigma, lam_theory)
    m_theory = recommend_sketch_size(d_theory, args.epsilon)
    rels = [float(r) for r in args.lambdas.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    print(f"{args.dataset}/{args.model}: n_train={len(split.train)}, queries {len(val)} val / {len(test)} test, d={sum(grads.dims):,}; "
          f"theory: λ={lam_theory / exact.sigma_max:.1e}·σ_max, d_λ={d_theory:.0f}, m=recommend_sketch_size(d_λ, ε={args.epsilon})={m_theory}")

    rows, summary = [], {"dataset": args.dataset, "model": args.model, "sigma_max": exact.sigma_max,
                         "theory": {"lambda_rel": lam_theory / exact.sigma_max, "d_lambda": d_theory, "m": m_theory}, "projectors": {}}
    for proj in projs:
        table_val = np.zeros((len(ms), len(rels)))
        table_test = np.zeros_like(table_val)
        for a, m in enumerate(ms):
            projector = C.make_sketch_projector(proj, m, seed=args.seed)
            scorer = SketchedInfluence().fit(C.sketch_store(projector, grads.train_store, grads.dims, "none"))
            queries = C.sketch_rows(projector, grads.test_rows, grads.dims)
            for b, scores in enumerate(scorer.score_grid(queries, [r * scorer.sigma_max for r in rels])):
                table_val[a, b], table_test[a, b] = lds_on(scores, val), lds_on(scores, test)
                rows.append({"projector": proj, "m": m, "lambda_rel": rels[b], "lds_val": table_val[a, b], "lds_test": table_test[a, b],
                             "d_lambda": effective_dimension(exact._sigma, rels[b] * exact.sigma_max)})
        a, b = np.unravel_index(np.argmax(table_val), table_val.shape)
        lam_star = rels[b] * exact.sigma_max
        d_star = effective_dimension(exact._sigma, lam_star)
        # theory-driven point (m_theory need not be on the grid)
        projector = C.make_sketch_projector(proj, min(m_theory, sum(grads.dims)), seed=args.seed)
        scorer = SketchedInfluence().fit(C.sketch_store(projector, grads.train_store, grads.dims, "none"))
        theory_scores = scorer.score(C.sketch_rows(projector, grads.test_rows, grads.dims), damping=lam_theory)
        theory_test = lds_on(theory_scores, test)
        best_test = float(table_test.max())
        summary["projectors"][proj] = {
            "utility": {"m": ms[a], "lambda_rel": rels[b], "d_lambda": d_star, "m_ge_d_lambda": bool(ms[a] >= d_star),
                        "lds_val": float(table_val[a, b]), "lds_test": float(table_test[a, b])},
            "theory": {"m": projector.m, "lambda_rel": lam_theory / exact.sigma_max, "lds_test": theory_test},
            "grid_best_test": best_test, "theory_gap_to_grid_best": best_test - theory_test,
            "lds_val": table_val.tolist(), "lds_test": table_test.tolist(),
        }
        print(f"\n{proj}: LDS on validation queries (rows m, columns λ/σ_max)")
        print(f"{'m':>6} " + " ".join(f"{r:>7.0e}" for r in rels))
        for i, m in enumerate(ms):
            print(f"{m:>6} " + " ".join(f"{v:>7.3f}" for v in table_val[i]))
        print(f"  utility-driven: m*={ms[a]}, λ*={rels[b]:.0e}·σ_max (d_λ*={d_star:.0f}, m* ≥ d_λ*: {ms[a] >= d_star}); "
              f"test LDS {table_test[a, b]:.3f}")
        print(f"  theory-driven : m={projector.m}, λ={lam_theory / exact.sigma_max:.1e}·σ_max; test LDS {theory_test:.3f}; "
              f"grid best test LDS {best_test:.3f} (gap {best_test - theory_test:+.3f})")

    summary["seconds"] = time.perf_counter() - t_start
    stem = f"hyperparam_selection_{args.dataset}_{args.model}"
    out = C.write_outputs(args.output_dir, stem, summary, rows)
    plt = C.pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(projs), figsize=(4.2 * len(projs), 3.8), squeeze=False)
        for ax, proj in zip(axes[0], projs):
            info = summary["projectors"][proj]
            im = ax.imshow(np.array(info["lds_val"]), origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(rels)), [f"{r:.0e}" for r in rels], rotation=45, fontsize=7)
            ax.set_yticks(range(len(ms)), [str(m) for m in ms], fontsize=7)
            ax.set_xlabel("λ / σ_max")
            ax.set_ylabel("m")
            ax.set_title(f"{proj}: validation LDS", fontsize=9)
            u = info["utility"]
            ax.plot(rels.index(u["lambda_rel"]), ms.index(u["m"]), "r*", markersize=12, label="utility (λ*, m*)")
            ax.legend(fontsize=7, loc="lower left")
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{args.dataset}/{args.model}; theory: m={m_theory}, λ={lam_theory / exact.sigma_max:.1e}·σ_max", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
    print(f"\ntotal {summary['seconds']:.1f}s; wrote {out / stem}.json/.csv" + (" and .png" if plt else ""))
    return summary


if __name__ == "__main__":
    main()

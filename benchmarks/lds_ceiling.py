"""How high can LDS go on the language-model benches? The retraining noise ceiling, beside EKFAC.

The ground truth of each LM bench (``lds_methods.py``) is the query log-likelihood after retraining on
100 half-data subsets, averaged over 2 training seeds. Training noise bounds every attribution
method's LDS: even the subsets' true expected output E_seed[f(θ_S)] does not rank perfectly against a
2-seed average. This script retrains the *same* subsets with two fresh seeds each (two single-seed
replicates, cached beside the ground truth) and reports, per bench:

* ``seed-to-seed``: Spearman between the two replicates across subsets (mean over queries), r;
* ``noise ceiling`` (:func:`sketchattr.validate.lds_noise_ceiling`): the LDS the exact expected output
  would reach against the 2-seed ground truth, sqrt(2r / (1 + r)) per query (output = expectation + independent seed noise), averaged over queries
  (and from the mean r: the per-query r are noisy, and the square root's curvature biases their mean low);
  a linear attribution (a sum of per-example scores) can reach at most this, and less wherever the
  expected output is not additive in the examples;
* ``retrain ×1`` / ``retrain ×2``: LDS of retraining each subset once / twice more (the replicates and
  their mean used as the prediction): what brute-force retraining at that cost gets;
* EKFAC (final model) and EKFAC over the 4 checkpoints, the goal 1.2 × EKFAC, and the goal as a
  fraction of the noise ceiling.

    python benchmarks/lds_ceiling.py --cache_dir <dir> --plot docs/lds_ceiling.png   # three LM benches (~10 min; replicates cached after)
    python benchmarks/lds_ceiling.py --quick                 # markov, 20 subsets × 1 seed
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from lds_methods import LMBench, methods
from sketchattr.bench.ground_truth import LM_BENCHES
from sketchattr.bench.recipes import sequence_log_likelihoods, train_markov_lm
from sketchattr.validate import lds_noise_ceiling, subset_ground_truth

REPLICATE_SEEDS = (100_000, 200_000)  # training seed offsets of the two replicates (the ground truth uses 0..2K-1)
ONLY = ("SketchedInfluence", "dot", "sparse", "SOURCE", "refined")  # methods() rows left out: EKFAC and the ensemble stay


def replicate(bench: LMBench, offset: int, cache_dir: str, workers: int) -> np.ndarray:
    """The ground truth's subsets retrained once more with seeds ``offset + k``: outputs [K, n_query]."""
    k, n_train = bench.gt.masks.shape
    path = Path(cache_dir) / f"replicate_{bench.name}_K{k}_seed{offset}.h5"
    rep = subset_ground_truth(
        path, lambda pos, s: train_markov_lm(pos, seed=offset + s, text=bench.text),
        partial(sequence_log_likelihoods, data=bench.queries), n_train=n_train, n_seeds=1, progress=True,
        workers=workers, subsets=[np.flatnonzero(m) for m in bench.gt.masks], attrs={"bench": bench.name, "offset": offset},
    )
    return rep.outputs


def per_query_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman between columns of a and b [K, n_query] -> [n_query]."""
    return np.array([spearmanr(a[:, q], b[:, q])[0] for q in range(a.shape[1])])


def plot(rows: list[tuple], path: str) -> None:
    """Horizontal bars per bench: retraining once / twice more, EKFAC, EKFAC over 4 checkpoints, the goal
    1.2 × EKFAC, and the noise ceiling as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["retrain each subset once more", "retrain each subset twice more", "EKFAC",
              "EKFAC over 4 checkpoints", "goal: 1.2 × EKFAC"]
    colors = ["#bbbbbb", "#888888", "#1f77b4", "#2ca02c", "#ff7f0e"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3.2), sharey=True, squeeze=False)
    for ax, (name, _, ceiling, _, once, twice, ekfac, ensemble) in zip(axes[0], rows):
        values = [once, twice, ekfac, ensemble, 1.2 * ekfac]
        ax.barh(range(len(values)), values, color=colors, hatch=[None] * 4 + ["//"])
        ax.axvline(ceiling, color="black", linestyle="--", label="noise ceiling")
        for i, v in enumerate(values):
            ax.text(v + 0.01, i, f"{v:.2f} ({v / ceiling:.0%})", va="center", fontsize=8,
                    bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.85))
        ax.set_title(f"{name} (ceiling {ceiling:.2f})", fontsize=10)
        ax.set_xlim(0, 1.0)
        ax.set_xlabel("LDS")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="markov, ground truth 20 subsets × 1 seed")
    parser.add_argument("--benches", nargs="+", default=["markov", "markov-wide", "prose"], choices=sorted(LM_BENCHES))
    parser.add_argument("--cache_dir", default="grad_cache")
    parser.add_argument("--workers", type=int, default=2, help="processes retraining the replicates")
    parser.add_argument("--plot", default=None, help="save the bars per bench (percent of the noise ceiling) to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in tqdm(["markov"] if args.quick else args.benches, desc="benches"):
        bench = LMBench(name, args.quick, args.cache_dir)
        y = bench.gt.outputs
        a, b = (replicate(bench, offset, args.cache_dir, args.workers) for offset in REPLICATE_SEEDS)
        noise = lds_noise_ceiling(a, b, n_seeds=bench.gt.attrs.get("n_seeds", 2))
        r, ceiling, pooled = noise.reliability, noise.per_query, noise.pooled
        once = np.mean([per_query_spearman(a, y).mean(), per_query_spearman(b, y).mean()])
        twice = per_query_spearman(a + b, y).mean()
        lds_of = {method: value for method, _, value, _ in methods(bench, ONLY)}
        ekfac, ensemble = lds_of["EKFAC"], lds_of["EKFAC over the 4 checkpoints (ensemble)"]
        rows.append((name, r.mean(), ceiling.mean(), pooled, once, twice, ekfac, ensemble))
        print(f"  {name}: seed-to-seed {r.mean():.3f}, ceiling {ceiling.mean():.3f} ({pooled:.3f} from mean r), retrain ×1 {once:.3f}, ×2 {twice:.3f}, "
              f"EKFAC {ekfac:.3f}, over 4 checkpoints {ensemble:.3f}", flush=True)
    print("\n| bench | seed-to-seed r | noise ceiling (from mean r) | retrain ×1 | retrain ×2 | EKFAC | EKFAC over 4 checkpoints "
          "| goal 1.2 × EKFAC | goal / ceiling |\n|---|---|---|---|---|---|---|---|---|")
    for name, r, ceiling, pooled, once, twice, ekfac, ensemble in rows:
        print(f"| {name} | {r:.3f} | {ceiling:.3f} ({pooled:.3f}) | {once:.3f} | {twice:.3f} | {ekfac:.3f} | {ensemble:.3f} "
              f"| {1.2 * ekfac:.3f} | {1.2 * ekfac / ceiling:.0%} ({1.2 * ekfac / pooled:.0%}) |")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

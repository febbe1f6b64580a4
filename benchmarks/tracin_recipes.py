"""The "fast TracIn" recipe, measured: last-N layers, random projection, train-set sampling.

Configurations (the recipe's table): baseline (all layers, no projection, 100% of rows) →
last-N layers → + projection to 256 → + 10% stratified sampling → both. For each: wall seconds
(featurize every checkpoint + score the queries), speedup against the baseline, top-10 overlap
and Spearman correlation with the baseline's scores (on the rows the configuration scores), and
on digits-mlp the LDS (sampled configurations predict Σ_{i∈S} w_i·score_i with the stored
importance weights).

Models: digits-mlp with checkpoints at epochs 20/40/60 of the bench recipe (lr 0.05 each; the
last is the bench model; "last-N" is the last 1 of its 2 layers), and a synthetic 1.33M-parameter
MLP on random data with 3 checkpoints (last-N = last 2 of its 3 layers).

    python benchmarks/tracin_recipes.py [--synthetic_rows 2000]
    python benchmarks/tracin_recipes.py --quick      # digits-mlp only

A progress bar (stderr) counts the configurations of each model.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import scipy.stats
import torch
from torch import nn
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.models.mlp import make_mlp
from sketchattr.bench.recipes import train_classifier
from sketchattr.sample import make_sampler
from sketchattr.bench.ground_truth import digits_ground_truth
from sketchattr.validate.lds import lds


def checkpoints(model: nn.Module, x, y, epochs: list[int], lr: float, seed: int = 0) -> list[nn.Module]:
    saved = []
    train_classifier(model, x, y, epochs=max(epochs), lr=lr, seed=seed,
                     on_epoch_end=lambda e, m: saved.append(copy.deepcopy(m).eval()) if e in epochs else None)
    return saved


def configs(last_n: int) -> list[tuple[str, dict]]:
    return [
        ("baseline", {}),
        (f"last-{last_n}", {"modules": last_n}),
        (f"last-{last_n} + proj 256", {"modules": last_n, "projector": "gaussian", "m": 256}),
        ("+ 10% sampling", {"modules": last_n, "projector": "gaussian", "m": 256, "sampler": "stratified"}),
        ("proj 256 + 10% (all layers)", {"projector": "gaussian", "m": 256, "sampler": "stratified"}),
    ]


def run(name: str, models, lrs, train, queries, last_n: int, gt=None) -> None:
    n = len(train)
    print(f"\n{name}: {sum(p.numel() for p in models[0].parameters()):,} params, {len(models)} checkpoints, {n} train rows, {len(queries)} queries")
    print(f"{'configuration':<30} {'seconds':>8} {'speedup':>8} {'top-10 overlap':>15} {'Spearman':>9}" + (f" {'LDS':>6}" if gt else ""), flush=True)
    base = None
    for label, cfg in tqdm(configs(last_n), desc=name, unit="config", leave=False):
        sampler = make_sampler("stratified", key="labels", rate=0.1, seed=0) if cfg.get("sampler") else None
        t0 = time.perf_counter()
        tracin = sa.tracin_from_checkpoints(models, sa.ClassificationTask(), train, lrs, projector=cfg.get("projector", "identity"),
                                            m=cfg.get("m"), seed=0, modules=cfg.get("modules"), sampler=sampler, batch_size=250)
        scores = tracin.score(queries).double()
        sec = time.perf_counter() - t0
        full = torch.zeros(len(queries), n, dtype=torch.float64)
        weights = torch.as_tensor(tracin.stores[0].weights, dtype=torch.float64)  # importance weights (1 without sampling)
        full[:, torch.as_tensor(tracin.train_indices)] = scores * weights
        if base is None:
            base = (sec, full)
        cols = torch.as_tensor(tracin.train_indices)
        top = set_overlap(full, base[1], cols)
        rho = float(np.mean([scipy.stats.spearmanr(scores[q].numpy(), base[1][q, cols].numpy())[0] for q in range(len(queries))]))
        line = f"{label:<30} {sec:>8.2f} {base[0] / sec:>7.1f}x {top:>15.2f} {rho:>9.3f}"
        if gt is not None:
            line += f" {lds(full.numpy(), gt).mean:>6.3f}"
        tqdm.write(line)


def set_overlap(full: torch.Tensor, base: torch.Tensor, cols: torch.Tensor, k: int = 10) -> float:
    """Mean |top-k(config) ∩ top-k(baseline)| / k over queries (config ranks only its own rows)."""
    ours = cols[torch.topk(full[:, cols], k, dim=1).indices]
    theirs = torch.topk(base, k, dim=1).indices
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ours, theirs)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic_rows", type=int, default=300, help="the baseline keeps unsketched gradients: 300 rows x 1.33M params x 3 checkpoints = 4.8 GB")
    ap.add_argument("--skip_synthetic", action="store_true")
    ap.add_argument("--quick", action="store_true", help="digits-mlp only (same as --skip_synthetic)")
    args = ap.parse_args()
    args.skip_synthetic = args.skip_synthetic or args.quick
    split = load_digits_split()
    models = checkpoints(make_mlp(seed=0), split.x_train, split.y_train, [20, 40, 60], lr=0.05)
    run("digits-mlp", models, [0.05] * 3, split.train_dataset(), split.query_dataset(), last_n=1, gt=digits_ground_truth())
    if not args.skip_synthetic:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.synthetic_rows + 100, 784, generator=g)
        y = (x[:, :10].argmax(1) + (torch.rand(len(x), generator=g) < 0.1).long()) % 10
        torch.manual_seed(0)
        big = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
        ck = checkpoints(big, x[:-100], y[:-100], [1, 2, 3], lr=0.01)
        run("synthetic-mlp", ck, [0.01] * 3, torch.utils.data.TensorDataset(x[:-100], y[:-100]),
            torch.utils.data.TensorDataset(x[-100:], y[-100:]), last_n=2)


if __name__ == "__main__":
    main()

"""How influence computations scale with model size and data size, on toy MLP regressions.

Model sizes (input 10 → hidden → 1): tiny [8] ≈ 97 params, small [16, 12] ≈ 393, medium [32, 16]
≈ 897, large [64, 40, 16] ≈ 4.0K, xlarge [128, 80, 48] ≈ 15.7K. Data: x ~ N(0, I), y = sin(x·w)
+ 0.1·noise. Strategies: identity | diagonal | kfac | ekfac (factored curvature scored from an
identity store) and sketched (SketchedInfluence on an SJLT store, m = --proj_dim, auto damping).

    python experiments/toy_scaling_test.py --test params --dataset_size 100 --query_size 20
    python experiments/toy_scaling_test.py --test data --model_size small
    python experiments/toy_scaling_test.py --test single --model_size medium --dataset_size 200 --query_size 50 --strategy ekfac
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import sketchattr as sa

SIZES = {"tiny": [8], "small": [16, 12], "medium": [32, 16], "large": [64, 40, 16], "xlarge": [128, 80, 48]}
IN_DIM = 10


def toy_model(size: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers, width = [], IN_DIM
    for h in SIZES[size]:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


def toy_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(IN_DIM, generator=torch.Generator().manual_seed(1234)) / IN_DIM**0.5
    x = torch.randn(n, IN_DIM, generator=g)
    y = torch.sin(3 * x @ w) + 0.1 * torch.randn(n, generator=g)
    return torch.utils.data.TensorDataset(x, y[:, None])


def train(model: nn.Module, data: torch.utils.data.TensorDataset, epochs: int, verbose: bool) -> None:
    x, y = data.tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(epochs):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if verbose and epoch % max(1, epochs // 5) == 0:
            print(f"Epoch {epoch}, Loss: {loss.item():.4f}")
    model.eval()


def run(size: str, n_train: int, n_query: int, strategy: str, proj_dim: int, epochs: int, verbose: bool = True) -> dict:
    model = toy_model(size)
    params = sum(p.numel() for p in model.parameters())
    train_set, query_set = toy_data(n_train, seed=1), toy_data(n_query, seed=2)
    if verbose:
        print(f"\n=== Experiment: {size} model, {n_train} train samples, {n_query} query samples, {strategy} ===")
        print(f"Model parameters: {params:,}")
        print("Training model...")
    train(model, train_set, epochs, verbose)
    task = sa.RegressionTask()
    sketched = strategy == "sketched"
    projector = ("sjlt" if proj_dim < params else "identity") if sketched else "identity"
    feat = sa.Featurizer(model, task, projector=projector, m=proj_dim if projector == "sjlt" else None, batch_size=64, progress=False)
    t0 = time.perf_counter()
    store = feat.featurize(train_set)
    if verbose:
        print("Computing factors...")
    if sketched:
        scorer = sa.SketchedInfluence().fit(store)
    elif strategy == "identity":
        scorer = sa.IdentityScorer(feat).fit(store)
    else:
        factors = sa.fit_factors(model, task, train_set, kind="diagonal" if strategy == "diagonal" else "ekfac", progress=False)
        scorer = {"diagonal": sa.DiagonalScorer, "kfac": sa.KFACScorer, "ekfac": sa.EKFACScorer}[strategy](factors, feat).fit(store)
    t_factor = time.perf_counter() - t0
    if verbose:
        print(f"Factor computation time: {t_factor:.2f}s")
        print("Computing influence scores...")
    t0 = time.perf_counter()
    scores = scorer.score(feat.query_rows(query_set)) if sketched else scorer.score(query_set)
    t_score = time.perf_counter() - t0
    if verbose:
        print(f"Score computation time: {t_score:.2f}s")
        print(f"Scores shape: {tuple(scores.shape)}")
        print(f"Total time: {t_factor + t_score:.2f}s")
    return {"size": size, "params": params, "n_train": n_train, "n_query": n_query, "strategy": strategy,
            "factor_s": t_factor, "score_s": t_score, "shape": tuple(scores.shape)}


def growth(rows: list[dict], key: str) -> str:
    """Log-log slope of total time against ``key`` (how time grows)."""
    x = np.log([r[key] for r in rows])
    y = np.log([r["factor_s"] + r["score_s"] for r in rows])
    if len(rows) < 2 or np.ptp(x) == 0:
        return "n/a"
    return f"time ∝ {key}^{np.polyfit(x, y, 1)[0]:.2f}"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", default="single", choices=["params", "data", "single"])
    ap.add_argument("--model_size", default="small", choices=list(SIZES))
    ap.add_argument("--dataset_size", type=int, default=100)
    ap.add_argument("--query_size", type=int, default=20)
    ap.add_argument("--strategy", default="ekfac", choices=["identity", "diagonal", "kfac", "ekfac", "sketched"])
    ap.add_argument("--proj_dim", type=int, default=1024, help="sketch size of the 'sketched' strategy")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--model-size", dest="model_size", choices=list(SIZES), default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spellings
    for old in ("--dataset-size", "--query-size", "--proj-dim"):
        ap.add_argument(old, dest=old[2:].replace("-", "_"), type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    run("tiny", 20, 5, args.strategy, args.proj_dim, 2, verbose=False)  # warm-up: first-call overheads out of the timings
    if args.test == "params":
        rows = [run(s, args.dataset_size, args.query_size, args.strategy, args.proj_dim, args.epochs) for s in ("tiny", "small", "medium", "large")]
    elif args.test == "data":
        rows = [run(args.model_size, n, args.query_size, args.strategy, args.proj_dim, args.epochs) for n in (50, 100, 200, 500)]
    else:
        rows = [run(args.model_size, args.dataset_size, args.query_size, args.strategy, args.proj_dim, args.epochs)]
    print(f"\n{'model':<7} {'params':>7} {'train':>6} {'query':>6} {'strategy':<9} {'factor s':>9} {'score s':>8} {'scores shape':>14}")
    for r in rows:
        print(f"{r['size']:<7} {r['params']:>7,} {r['n_train']:>6} {r['n_query']:>6} {r['strategy']:<9} {r['factor_s']:>9.3f} "
              f"{r['score_s']:>8.3f} {str(r['shape']):>14}")
    if args.test == "params":
        print(growth(rows, "params"))
    elif args.test == "data":
        print(growth(rows, "n_train"))
    return rows


if __name__ == "__main__":
    main()

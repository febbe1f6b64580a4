"""``sketchattr demo``: the main job on bundled data — which digits-training images made the model
call each query so? Trains the digits-mlp bench model, sketches its 1,000 training gradients,
scores the 100 queries and prints the top proponents and opponents of a few."""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sketchattr.bench.data.digits import load_digits_split
from sketchattr.featurize import Featurizer
from sketchattr.bench.recipes import train_digits_mlp
from sketchattr.score import SketchedInfluence
from sketchattr.task import ClassificationTask


HELP = "train digits-mlp on bundled data and print top proponents/opponents"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    p.add_argument("--m", type=int, default=1024, help="sketch size (default 1024)")
    p.add_argument("--projector", default="sjlt", choices=["sjlt", "gaussian", "rademacher", "identity"])
    p.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2], help="query positions to print")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="projector seed")


def run(args: argparse.Namespace) -> None:
    run_demo(m=args.m, projector=args.projector, queries=tuple(args.queries), k=args.k, seed=args.seed)


def run_demo(m: int = 1024, projector: str = "sjlt", queries: tuple[int, ...] = (0, 1, 2), k: int = 5, seed: int = 0) -> None:
    """Train digits-mlp (docs/benchmarks.md recipe), featurize, score the 100 queries, print top-k."""
    t0 = time.perf_counter()
    split = load_digits_split()
    model = train_digits_mlp(seed=0, split=split)
    with torch.no_grad():
        acc = (model(split.x_query).argmax(1) == split.y_query).float().mean().item()
    t1 = time.perf_counter()
    print(f"trained digits-mlp (9,610 params) on {len(split.y_train)} rows in {t1 - t0:.1f}s; query accuracy {acc:.1%}")

    featurizer = Featurizer(model, ClassificationTask(), projector=projector, m=m, seed=seed, batch_size=100)
    print(featurizer.selection().summary())
    store = featurizer.featurize(split.train_dataset())
    scorer = SketchedInfluence(damping="auto").fit(store)
    query_rows = featurizer.query_rows(split.query_dataset())
    scores = scorer.score(query_rows)
    top = scorer.top_k(query_rows, k=k)
    t2 = time.perf_counter()
    print(
        f"\n{projector} sketch m={m}: scored {scores.shape[0]} queries x {scores.shape[1]} train rows in {t2 - t1:.1f}s; "
        f"auto damping λ={scorer.damping_:.3g} (= {scorer.damping_ / scorer.sigma_max:.1e}·σ_max), d_λ={scorer.effective_dimension():.0f}"
    )
    y_train = dict(zip(store.indices.tolist(), split.y_train.tolist()))
    for q in queries:
        label = int(split.y_query[q])
        pred = int(model(split.x_query[q : q + 1]).argmax())
        print(f"\nquery {q}: label {label}, predicted {pred}")
        _print_row("  proponents (helped)", top.proponents[q], top.proponent_scores[q], y_train)
        _print_row("  opponents  (hurt)  ", top.opponents[q], top.opponent_scores[q], y_train)
    same = np.mean([[y_train[i] == int(split.y_query[q]) for i in top.proponents[q].tolist()] for q in range(len(split.y_query))])
    print(f"\nacross all {len(split.y_query)} queries, {same:.0%} of top-{k} proponents share the query's label")
    print(f"total {time.perf_counter() - t0:.1f}s")


def _print_row(title: str, idx: torch.Tensor, scores: torch.Tensor, labels: dict[int, int]) -> None:
    cells = ", ".join(f"#{i} (label {labels[i]}, {s:+.3g})" for i, s in zip(idx.tolist(), scores.tolist()))
    print(f"{title}: {cells}")

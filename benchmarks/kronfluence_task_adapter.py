"""A Kronfluence Task, unchanged, through ``sa.KronfluenceTask``: our scores against Kronfluence's own.

The same ``kronfluence.task.Task`` subclass (digits-mlp, a loss-like measurement −margin as
Kronfluence's examples use) is given to Kronfluence 1.0.1's ``Analyzer`` and, wrapped in
``sa.KronfluenceTask``, to sketchattr's scorers on an exact (identity) store. Printed per
strategy: Pearson correlation of the pairwise scores [100 queries, 1,000 train], the largest
difference relative to the largest score, and the fraction of top-10 proponents shared — for the
adapter and for a Task ported by renaming the methods (which keeps Kronfluence's measurement and
so flips every sign). Both fit the empirical Fisher (no sampled labels) and damp with
Kronfluence's heuristic 0.1·mean(Λ) per module, so ``identity`` (gradient dot products) and
``ekfac`` must both agree to round-off. Run in Kronfluence's venv:

    python -m venv /tmp/kf && /tmp/kf/bin/pip install kronfluence==1.0.1 h5py scikit-learn tqdm
    PYTHONPATH=. /tmp/kf/bin/python benchmarks/kronfluence_task_adapter.py [--quick]
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.recipes import train_digits_mlp
from sketchattr.task import margin


def digits_task_class():
    from kronfluence.task import Task

    class DigitsTask(Task):  # written for Kronfluence, as a user would
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return -margin(model(x), y).sum()  # loss-like: Kronfluence's positive score = helpful

    return DigitsTask


def kronfluence_scores(model, task, split, strategy: str) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    torch.manual_seed(0)
    model = prepare_model(copy.deepcopy(model), task)  # Kronfluence wraps the modules in place
    analyzer = Analyzer(analysis_name="adapter", model=model, task=task, cpu=True,
                        output_dir=tempfile.mkdtemp(), disable_tqdm=True)
    analyzer.fit_all_factors(factors_name=strategy, dataset=split.train_dataset(), factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=True),
                             per_device_batch_size=100, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(scores_name=strategy, factors_name=strategy, query_dataset=split.query_dataset(),
                                     train_dataset=split.train_dataset(), per_device_query_batch_size=100,
                                     per_device_train_batch_size=250, overwrite_output_dir=True,
                                     score_args=ScoreArguments(damping_factor=None))
    return analyzer.load_pairwise_scores(strategy)["all_modules"].double()


def our_scores(model, task: sa.Task, split, strategy: str) -> torch.Tensor:
    feat = sa.Featurizer(model, task, projector="identity", batch_size=100, progress=False)
    store = feat.featurize(split.train_dataset())
    if strategy == "identity":
        scorer = sa.IdentityScorer(feat)
    else:
        factors = sa.fit_factors(model, task, split.train_dataset(), kind="ekfac", fisher="empirical", batch_size=100,
                                 progress=False)
        scorer = sa.EKFACScorer(factors, feat, damping=None)  # 0.1·mean(Λ) per module, Kronfluence's heuristic
    return scorer.fit(store).score(split.query_dataset()).double()


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    pearson = float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])
    rel = float((a - b).abs().max() / b.abs().max())
    top_a, top_b = a.topk(10, dim=1).indices, b.topk(10, dim=1).indices
    shared = float(np.mean([len(set(x.tolist()) & set(y.tolist())) / 10 for x, y in zip(top_a, top_b)]))
    return pearson, rel, shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default="identity,ekfac")
    ap.add_argument("--quick", action="store_true", help="identity only (exact agreement, ~20 s)")
    args = ap.parse_args()
    strategies = ["identity"] if args.quick else args.strategies.split(",")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    split = load_digits_split()
    model = train_digits_mlp(seed=0, split=split).eval()
    native = digits_task_class()()

    class Renamed(sa.Task):  # the silent mistake: Kronfluence's methods renamed, its measurement kept
        def train_loss(self, model, batch, sample=False):
            return native.compute_train_loss(batch, model, sample)

        def measurement(self, model, batch):
            return native.compute_measurement(batch, model)

    print(f"{'strategy':<9} {'task given to sketchattr':<26} {'Pearson':>8} {'max |Δ|/max':>12} {'top-10 shared':>14}")
    for strategy in tqdm(strategies, desc="strategies"):
        theirs = kronfluence_scores(model, native, split, strategy)
        for name, task in (("sa.KronfluenceTask(task)", sa.KronfluenceTask(native)), ("methods renamed", Renamed())):
            p, rel, shared = compare(our_scores(model, task, split, strategy), theirs)
            tqdm.write(f"{strategy:<9} {name:<26} {p:>8.4f} {rel:>12.2e} {shared:>14.2f}")


if __name__ == "__main__":
    main()

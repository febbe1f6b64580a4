"""Kronfluence-shaped Tasks, unchanged, through Kronfluence 1.0.1 and through ``sa.KronfluenceTask``.

The set-ups of ``tests/kronfluence_shaped_tasks.py`` are written in the shape of Kronfluence's
own ``tests/testable_tasks``: a regression MLP whose Task reads ``model.parameters()``, a module
used three times, ``checkpoint_sequential``, Conv2d + BatchNorm + in-place ReLU, GPT-2 with
Hugging Face gradient checkpointing, BERT with padding, RoBERTa multiple choice with ``[B, C, T]``
masks and ``post_process_per_sample_gradient``. Each task object is given to Kronfluence's
``Analyzer`` (as a subclass of ``kronfluence.task.Task``) and, wrapped in ``sa.KronfluenceTask``,
to sketchattr, with each library's *default* modules (and Kronfluence told
``has_shared_parameters=True`` for the model whose layer runs three times, as its own tests do) (Kronfluence: every leaf nn.Linear and
nn.Conv2d, or the Task's ``get_influence_tracked_modules``). Both in float64, empirical Fisher,
damping 0.1·mean(Λ) per module (Kronfluence's ``damping_factor=None``, sketchattr's
``damping=None``). Printed per set-up and strategy (identity = gradient dot products, EKFAC):
Pearson correlation of all [query, train] scores and the largest difference relative to the
largest score. Goal: Pearson ≥ 0.99999 everywhere. Known difference, Kronfluence's: on a module
that runs several times per forward its pairwise scores keep one call's share unless the Task
sets a post-process function (see :func:`kronfluence`); with an identity one they equal the
dense formula, and ours (tests/test_kronfluence_tasks.py checks ours against it in float64).

Kronfluence is not a dependency: run in a venv that has it, with our package and tests on the path:

    python -m venv --system-site-packages /tmp/kf
    /tmp/kf/bin/pip install --no-deps kronfluence==1.0.1 accelerate einops opt_einsum einconv
    cd $(mktemp -d) && PYTHONPATH=/path/to/repo /tmp/kf/bin/python /path/to/repo/benchmarks/kronfluence_testable_tasks.py [--quick]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sketchattr as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kronfluence_padded_lm import pearson, rel  # noqa: E402  (this folder: the script's own)
from kronfluence_shaped_tasks import SETUPS, Setup  # noqa: E402  (the test suite's set-ups)

SHARED = {"shared_layer_mlp"}
"""Set-ups with a module called more than once per forward (sketchattr needs no flag for it)."""


def ours(setup: Setup, strategy: str) -> torch.Tensor:
    task = sa.KronfluenceTask(setup.task)
    feat = sa.Featurizer(setup.model, task, projector="identity", batch_size=4, progress=False)
    store = feat.featurize(setup.train)
    if strategy == "identity":
        return sa.IdentityScorer(feat).fit(store).score(setup.queries)
    factors = sa.fit_factors(setup.model, task, setup.train, kind="ekfac", fisher="empirical", batch_size=4, progress=False)
    return sa.EKFACScorer(factors, feat, damping=None).fit(store).score(setup.queries)


def kronfluence(setup: Setup, strategy: str, out: str, shared: bool, accumulate: bool = False) -> torch.Tensor:
    """Kronfluence 1.0.1's pairwise scores. ``shared``: a module runs more than once per forward,
    which Kronfluence must be told (``FactorArguments(has_shared_parameters=True)``, as its own
    tests of such models do), else it keeps only one call's activations. ``accumulate``: give the
    task an identity ``post_process_per_sample_gradient`` — Kronfluence 1.0.1's pairwise-score hook
    *assigns* each call's score of a shared module (keeping the first call's share only) unless a
    post-process function is set, in which case it adds them (module/tracker/pairwise_score.py)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    task_cls = type(setup.task)
    extra = {} if not accumulate else {"enable_post_process_per_sample_gradient": True,
                                       "post_process_per_sample_gradient": lambda self, module_name, gradient: gradient}
    task = type(task_cls.__name__, (task_cls, KTask), extra)  # the same methods, as a kronfluence Task
    k_task = task.__new__(task)
    k_task.__dict__.update(setup.task.__dict__)
    model = prepare_model(setup.model, k_task)
    analyzer = Analyzer(analysis_name="shaped", model=model, task=k_task, cpu=True, disable_tqdm=True, output_dir=out)
    f64 = torch.float64
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=f64,
                            gradient_covariance_dtype=f64, lambda_dtype=f64, has_shared_parameters=shared)
    analyzer.fit_all_factors(factors_name="f", dataset=setup.train, per_device_batch_size=4, factor_args=fargs,
                             overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64)
    analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=setup.queries, train_dataset=setup.train,
                                     per_device_query_batch_size=len(setup.queries), per_device_train_batch_size=4,
                                     score_args=sargs, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("s")["all_modules"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three set-ups (MLP, Conv+BN, multiple choice)")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=None)
    args = parser.parse_args()
    names = args.setups or (["regression_mlp", "conv_bn_inplace", "roberta_multiple_choice"] if args.quick else list(SETUPS))
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows, known = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(names, desc="set-ups"):
            for strategy in ("identity", "ekfac"):
                t0 = time.perf_counter()
                a = ours(SETUPS[name](), strategy)
                t1 = time.perf_counter()
                shared = name in SHARED
                b = kronfluence(SETUPS[name](), strategy, f"{tmp}/{name}-{strategy}", shared=shared, accumulate=shared)
                t2 = time.perf_counter()
                rows.append((name, strategy, pearson(a, b), rel(b, a), t1 - t0, t2 - t1))
                if shared:  # Kronfluence as it is: its pairwise hook keeps one call of the shared layer
                    b = kronfluence(SETUPS[name](), strategy, f"{tmp}/{name}-{strategy}-as-is", shared=True)
                    known.append((name, strategy, pearson(a, b), rel(b, a)))
    print("\n| set-up | strategy | Pearson | max rel. diff | sketchattr s | Kronfluence s |")
    print("|---|---|---|---|---|---|")
    for name, strategy, p, r, ta, tb in rows:
        print(f"| {name} | {strategy} | {p:.9f} | {r:.2e} | {ta:.1f} | {tb:.1f} |")
    for name, strategy, p, r in known:
        print(f"| {name} (Kronfluence without the accumulating post-process: keeps one call) | {strategy} | {p:.9f} | "
              f"{r:.2e} | | |")
    worst = min(p for _, _, p, *_ in rows)
    print(f"\nlowest Pearson {worst:.9f} (goal >= 0.99999): {'met' if worst >= 0.99999 else 'NOT met'}")


if __name__ == "__main__":
    main()

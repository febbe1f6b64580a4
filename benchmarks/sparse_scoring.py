"""Scoring a sparse-eigenbasis store: the CSR product against gathering the queries at every index.

A :class:`~sketchattr.SparseEigenbasisProjector` row holds k (value, index) pairs. Scoring computes,
per query and row, Σ_j W_q[idx_j] · value_j. Two ways, timed on the same store and queries (median
of ``--repeats``, the rest of ``EKFACScorer.score`` included):

* **gather**: W_q gathered at every row's indices, [n_query, rows, k] per block, then summed;
* **CSR**: the rows as a sparse CSR matrix [rows, d] times the queries (what ``score`` uses from
  ``SPARSE_MATMUL_QUERIES`` = 8 queries on).

Stores: the markov LM bench (2-layer GPT-2, d = 99,456, 400 sequences, 50 queries) at d/8, and the
digits MLP (d = 9,610, 1,000 rows, 100 queries) at m = 1,024.

    python benchmarks/sparse_scoring.py              # 5 repeats (~2 min on 2 cores)
    python benchmarks/sparse_scoring.py --quick      # the digits MLP only, 2 repeats
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

import sketchattr as sa
import sketchattr.curvature.eigenbasis as eigenbasis
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.data.markov import markov_text
from sketchattr.bench.recipes import train_checkpoints, train_markov_lm


def digits() -> tuple:
    split = load_digits_split()
    model = train_checkpoints("digits-mlp", epochs=(60,), seed=0, split=split)[0]
    task, train = sa.ClassificationTask(), split.train_dataset()
    return "digits MLP, m = 1,024", model, task, train, split.query_dataset(), None, lambda d: 1024


def markov() -> tuple:
    text = markov_text()
    model = train_markov_lm(text=text)
    return "markov LM, d/8", model, sa.CausalLMTask(), text.train, text.queries, sa.PadCollator(), lambda d: 2 * (d // 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the digits MLP only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 2 if args.quick else args.repeats
    print("| store | rows × k | queries | gather s | CSR s | gather / CSR | max rel. diff |\n|---|---|---|---|---|---|---|")
    for build in tqdm([digits] if args.quick else [digits, markov], desc="stores"):
        name, model, task, train, queries, collate, width = build()
        factors = sa.fit_factors(model, task, train, kind="ekfac", modules="linear", collate_fn=collate, progress=False)
        d = sum(lay.dim for lay in factors.layouts.values())
        feat = sa.Featurizer(model, task, modules="linear", projector=sa.SparseEigenbasisProjector(width(d), factors),
                             collate_fn=collate, progress=False)
        store = feat.featurize(train)
        scorer = sa.EKFACScorer(factors, feat).fit(store)
        prepared = scorer.prepare_queries(queries)
        timings, scores = {}, {}
        for path, threshold in (("gather", 10**9), ("CSR", eigenbasis.SPARSE_MATMUL_QUERIES)):
            saved, eigenbasis.SPARSE_MATMUL_QUERIES = eigenbasis.SPARSE_MATMUL_QUERIES, threshold
            try:
                runs = []
                for _ in tqdm(range(repeats), desc=path, leave=False):
                    t0 = time.perf_counter()
                    scores[path] = scorer.score(prepared)
                    runs.append(time.perf_counter() - t0)
            finally:
                eigenbasis.SPARSE_MATMUL_QUERIES = saved
            timings[path] = statistics.median(runs)
        diff = float((scores["gather"] - scores["CSR"]).abs().max() / scores["gather"].abs().max())
        n_query = scores["CSR"].shape[0]
        print(f"| {name} | {len(store):,} × {width(d) // 2:,} | {n_query} | {timings['gather']:.3f} | {timings['CSR']:.3f} "
              f"| {timings['gather'] / timings['CSR']:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

"""Big-model disk run: featurize a ≥ 10M-parameter GPT-style LM over 10⁵ synthetic sequences into
an HDF5 store (resumable), fit sketched influence on it, score 1,000 queries with top-k, and print a
per-stage profiler table, peak RSS, store size and the extrapolated time of the full run.

Stages (each a row of the table; nested rows overlap their stage's percent):
build model → featurize train into the store (``--offload disk``: resumable; ``--max_minutes`` /
``--stop_after_rows`` stop early, re-running the same command continues) → fit
``SketchedInfluence`` (F̂ streamed from the store, one eigh) → featurize the queries (gradients of
``CausalLMTask.measurement``, the query's log-likelihood) → streaming top-k.

The model is the randomly initialised ``gpt-14m`` preset (13.8M params; no training — this run
measures the pipeline, not attribution quality) on ``RandomTokens`` (seeded, generated per index).
Sketches cover every Linear layer (embeddings and LayerNorms are not Linear).

    python experiments/big_model_run.py --max_minutes 8 --dtype bfloat16 --compute_dtype bfloat16
    python experiments/big_model_run.py --quick --store /tmp/quick.h5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import sketchattr as sa
from sketchattr.core.profiler import Profiler
from sketchattr.bench.data.synthetic import RandomTokens
from sketchattr.bench.models.gpt import PRESETS, GPTConfig, gpt_config, make_gpt
from sketchattr.task import CausalLMTask

QUICK = {"params": "tiny", "num_train": 300, "num_query": 20, "m": 144, "batch_size": 32, "k": 5}
STAGES = ("build model", "featurize train", "fit SketchedInfluence", "featurize queries", "top-k")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"tiny model, a few hundred sequences (CI): {QUICK}")
    ap.add_argument("--params", default="gpt-14m", choices=sorted(PRESETS), help="model preset (default gpt-14m, 13.8M params)")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    ap.add_argument("--d_model", type=int, default=None)
    ap.add_argument("--n_layer", type=int, default=None)
    ap.add_argument("--n_head", type=int, default=None)
    ap.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's, 64)")
    ap.add_argument("--num_train", type=int, default=100_000)
    ap.add_argument("--num_query", type=int, default=1000)
    ap.add_argument("--proj", default="factorized", choices=["factorized", "sjlt", "gaussian", "rademacher"])
    ap.add_argument("--m", type=int, default=4096, help="sketch size; factorized: per-layer m_out×m_in ≤ m / (Linear layers)")
    ap.add_argument("--factor", default=None, metavar="OUTxIN", help="factorized per-layer sizes, e.g. 16x16 (overrides --m)")
    ap.add_argument("--offload", default="disk", choices=["disk", "cpu", "none"])
    ap.add_argument("--store", default=None, help="HDF5 path (default grad_cache/big_<settings>.h5)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--k", type=int, default=10, help="top-k proponents/opponents per query")
    ap.add_argument("--max_minutes", type=float, default=None, help="stop featurizing train after this budget (resumable)")
    ap.add_argument("--stop_after_rows", type=int, default=None, help="stop featurizing train after this many new rows")
    ap.add_argument("--no_resume", action="store_true", help="discard the store's rows and start over")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="store dtype")
    ap.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"], help="model / gradient dtype")
    ap.add_argument("--seed", type=int, default=0, help="model init, projector and data seed")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the summary (and top-k) to this JSON file")
    for old in ("--d-model", "--n-layer", "--n-head", "--seq-len", "--num-train", "--num-query", "--batch-size", "--stop-after-rows"):
        ap.add_argument(old, dest=old[2:].replace("-", "_"), type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spellings
    ap.add_argument("--max-minutes", dest="max_minutes", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ap.add_argument("--no-resume", dest="no_resume", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ap.add_argument("--compute-dtype", dest="compute_dtype", choices=["float32", "bfloat16"], default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    return args


def projector_for(args: argparse.Namespace, n_linear: int) -> "sa.Projector | str":
    """The projector: factorized with ``--factor`` or m_out·m_in ≤ m / n_linear (as square as possible)."""
    if args.proj != "factorized":
        return args.proj
    if args.factor:
        try:
            m_out, m_in = (int(x) for x in args.factor.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--factor must look like 16x16, got {args.factor!r}") from None
    else:
        per = args.m // n_linear
        if per < 1:
            raise SystemExit(f"--m {args.m} is smaller than the {n_linear} Linear layers a factorized sketch concatenates")
        m_out = math.isqrt(per)
        m_in = per // m_out
    return sa.FactorizedProjector(m_out, m_in, seed=args.seed)


def store_path(args: argparse.Namespace, cfg: GPTConfig, m: int) -> Path:
    if args.store:
        return Path(args.store)
    name = (f"big_{args.params}_v{cfg.vocab}_d{cfg.d_model}_l{cfg.n_layer}_T{cfg.seq_len}_{args.proj}{m}"
            f"_n{args.num_train}_s{args.seed}_{args.compute_dtype}_{args.dtype}.h5")
    return Path("grad_cache") / name


def peak_rss_mb() -> float:
    """Peak resident set size of this process (``ru_maxrss``, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extrapolate(prof: Profiler, n_total: int, n_stored: int, rate: float, m: int) -> dict[str, float]:
    """Seconds of each stage for the full ``n_total`` rows: featurizing at ``rate`` rows/s, top-k
    linear in the rows, build and queries as measured. The fit is scaled by its flop counts: F̂
    accumulation ∝ n·m², eigh ∝ m³ on the eigen path; the Gram path (n < m) does n²·m and an n³
    eigh, so a short run's Gram timings are converted to the path the full run will take."""
    total = lambda a: sum(prof.durations.get(a, []))
    n = max(n_stored, 1)
    scale = n_total / n
    eigh = total("fit: eigendecomposition")
    if total("fit: Gram matrix") > 0:  # measured on the Gram path
        gram = total("fit: Gram matrix")
        if n_total <= m:
            fit = gram * scale**2 + eigh * scale**3
        else:  # syrk of n_total·m² (half of a product) at the Gram product's flop rate; eigh of m
            fit = gram * (n_total * m * m / 2) / (n * n * m) + eigh * (m / n) ** 3
    else:
        fit = total("fit: accumulate Fhat") * scale + eigh
    est = {
        "build model": total("build model"),
        "featurize train": n_total / rate if rate > 0 else float("inf"),
        "fit SketchedInfluence": fit,
        "featurize queries": total("featurize queries"),
        "top-k": total("top-k") * scale,
    }
    est["total"] = sum(est.values())
    return est


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All stages; prints the report and returns the summary (with top-k indices and scores)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    prof = Profiler()
    cfg = gpt_config(args.params, vocab=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head)
    with prof.record("build model"):
        model = make_gpt(cfg, seed=args.seed).to(getattr(torch, args.compute_dtype)).eval()
        linear = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        projector = projector_for(args, len(linear))
        feat = sa.Featurizer(model, CausalLMTask(), modules=linear, projector=projector, m=args.m, seed=args.seed,
                             batch_size=args.batch_size, progress=not args.quick, profiler=prof)
        m = feat.projector.output_dim(feat.selection().dims)
    train_set = RandomTokens(args.num_train, cfg.seq_len, cfg.vocab, seed=2 * args.seed)
    query_set = RandomTokens(args.num_query, cfg.seq_len, cfg.vocab, seed=2 * args.seed + 1)
    path = store_path(args, cfg, m)
    # partial=True: a run stopped early (--stop-after-rows, --max-minutes) is scored on the rows it wrote
    store_kwargs = {"path": path, "storage_dtype": args.dtype, "partial": True} if args.offload == "disk" else {}
    print(f"model: {args.params} {cfg} = {cfg.num_params:,} params ({args.compute_dtype}); {len(linear)} Linear layers sketched")
    print(f"sketch: {feat.projector.spec()} -> m = {m}; store: {args.offload}" + (f" {path} ({args.dtype})" if args.offload == "disk" else ""))
    print(f"data: {args.num_train:,} train / {args.num_query:,} query random-token sequences of {cfg.seq_len}; batch {args.batch_size}; "
          f"{torch.get_num_threads()} torch threads")

    budget = None if args.max_minutes is None else 60.0 * args.max_minutes
    cpu0 = time.process_time()
    with prof.record("featurize train"):
        store = feat.featurize(train_set, store=args.offload, overwrite=args.no_resume, max_rows=args.stop_after_rows,
                               max_seconds=budget, **store_kwargs)
    cpu_s = time.process_time() - cpu0  # CPU seconds of all this process's threads: unaffected by other jobs' load
    done = feat.last_run
    prof.count("featurize train", done.rows)
    n_stored = len(store)

    scorer = sa.SketchedInfluence(damping="auto", profiler=prof)
    with prof.record("fit SketchedInfluence", items=n_stored):
        scorer.fit(store)
    with prof.record("featurize queries", items=args.num_query):
        queries = feat.query_rows(query_set)
    k = min(args.k, n_stored)
    with prof.record("top-k", items=n_stored):
        top = scorer.top_k(queries, k=k)

    rate = done.rows / done.seconds if done.rows else 0.0
    summary: dict[str, Any] = {
        "params": cfg.num_params, "m": m, "projector": feat.projector.spec(), "n_train": args.num_train,
        "rows_this_run": done.rows, "rows_stored": n_stored, "remaining": done.remaining, "complete": done.complete,
        "featurize_rows_per_s": rate, "featurize_cpu_seconds": cpu_s, "peak_rss_mb": peak_rss_mb(), "damping": scorer.damping_,
        "store_bytes": path.stat().st_size if args.offload == "disk" else None,
        "stage_seconds": {s: sum(prof.durations.get(s, [])) for s in STAGES},
        "top_k": {"proponents": top.proponents.tolist(), "proponent_scores": top.proponent_scores.tolist(),
                  "opponents": top.opponents.tolist(), "opponent_scores": top.opponent_scores.tolist()},
    }
    print()
    print(prof.table(f"big_model_run: {n_stored:,} train rows stored ({done.rows:,} computed this run), {args.num_query:,} queries, m = {m}"))
    print(f"peak RSS: {summary['peak_rss_mb']:.0f} MiB")
    if summary["store_bytes"] is not None:
        full = args.num_train * m * (2 if args.dtype == "bfloat16" else 4)
        print(f"store on disk: {summary['store_bytes'] / 2**20:.1f} MiB for {n_stored:,} rows (full run: {full / 2**30:.2f} GiB of rows)")
    print(f"damping λ = {scorer.damping_:.3g} (auto), d_λ = {scorer.effective_dimension():.1f}")
    if done.rows and cpu_s > 0:
        threads = torch.get_num_threads()
        idle = threads * done.rows / cpu_s  # assumes the threads scale perfectly on cores of their own
        print(f"featurize train CPU time: {cpu_s:.0f} s for {done.rows:,} rows in {done.seconds:.0f} s wall; with its {threads} "
              f"threads on otherwise idle cores: ≈ {idle:.1f} rows/s, {args.num_train / idle / 60:.1f} min for {args.num_train:,} rows "
              "(other jobs on the cores inflate CPU time per row, so idle cores usually do better)")
    for q in range(min(2, args.num_query)):
        print(f"query {q}: top proponents {top.proponents[q, :3].tolist()} scores {[f'{s:.3g}' for s in top.proponent_scores[q, :3].tolist()]}")
    if not done.complete:
        est = extrapolate(prof, args.num_train, n_stored, rate, m)
        summary["extrapolated_seconds"] = est
        left = done.remaining / rate if rate > 0 else float("inf")
        print(f"\nstopped early: {n_stored:,} of {args.num_train:,} rows stored; featurizing at {rate:.1f} rows/s, the remaining "
              f"{done.remaining:,} rows take ≈ {left / 60:.1f} min (re-run the same command to continue).")
        print("extrapolated full run (" + ", ".join(f"{s} {v / 60:.1f} min" for s, v in est.items() if s != "total")
              + f"): total ≈ {est['total'] / 60:.1f} min")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])

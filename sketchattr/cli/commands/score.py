"""``sketchattr score`` (alias ``query``): top-k proponents and opponents of each query row.

Rebuilds the model and featurizer from the store's run spec, fits the scorer on the store
(``SketchedInfluence``, damping ``auto`` by default; ``--scorer ekfac`` fits EKFAC factors on the
training file first, kept in ``<store stem>.ekfac/``; ``--scorer refined`` also refines each query
with ``--iterations`` exact Gauss-Newton products over the training file), sketches the query file's measurement
gradients and writes to ``--output_dir``:

* ``topk.json``: settings, timings and per query ``{"query_index", "label", "proponents":
  [{"train_index", "score", "label"}], "opponents": [...]}`` (proponents highest score first,
  opponents lowest first; indices are rows of the data files);
* ``topk.csv``: one line per (query, kind, rank);
* ``report.html`` / ``report.png`` (``--report``): each query next to its top examples;
* ``scores.h5`` with ``--save_scores``: the full matrix ``scores`` [n_query, n_train] and
  ``train_indices`` (the input of ``sketchattr validate``).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Subset

from sketchattr.cli.commands.build import add_data_arguments
from sketchattr.cli.config import CommandError, add_config_argument, add_runtime_arguments, require, resolve_device
from sketchattr.cli.fit_checks import check_fits
from sketchattr.cli.labels import add_classes_argument
from sketchattr.cli.report import Cell, QueryReport, write_html, write_png
from sketchattr.cli.spec import Run, add_store_arguments, open_store
from sketchattr.curvature import fit_factors
from sketchattr.score import EKFACScorer, RefinedInfluence, SketchedInfluence

HELP = "top-k proponents/opponents of query rows -> JSON, CSV, HTML/PNG report"
ALIASES = ["query"]

REPORTS = ("html", "png", "both", "none")
SCORERS = ("sketched_influence", "ekfac", "refined")
EKFAC_FAMILY = ("ekfac", "refined")
"""Scorers whose curvature preconditioner amplifies a random sketch's inner-product error."""
RANDOM_PROJECTORS = ("sjlt", "gaussian", "rademacher")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    add_store_arguments(p)
    p.add_argument("--query_data", help="query rows: a data file like the training file (.pt, .npz, .csv, .jsonl, folder)")
    p.add_argument("--query_indices", type=int, nargs="+", default=None, help="score only these query rows")
    p.add_argument("--num_query", type=int, default=None, help="score only the first N query rows")
    p.add_argument("--k", type=int, default=10, help="proponents and opponents per query (default 10)")
    p.add_argument("--scorer", choices=SCORERS, default="sketched_influence",
                   help="sketched_influence (default; any store), ekfac (exact-gradient stores: --projector identity), or "
                        "refined (EKFAC refined by exact Gauss-Newton products; see docs/scorers.md)")
    p.add_argument("--damping", default="auto", help="'auto' or a number λ > 0 (ekfac: auto = max eigenvalue / 3e4 per module; "
                                                     "refined: auto = 10 x the mean eigenvalue)")
    p.add_argument("--iterations", type=int, default=None,
                   help="refined: at most this many Gauss-Newton products per query batch (default 10; 0 = EKFAC)")
    p.add_argument("--tol", type=float, default=None, help="refined: stop a query at this relative residual (default 0.05)")
    p.add_argument("--output_dir", default=None, help="where results go (default: <store stem>_scores beside the store)")
    p.add_argument("--report", choices=REPORTS, default="html", help="report of each query next to its top examples")
    p.add_argument("--report_queries", type=int, default=20, help="queries shown in the report (default 20)")
    p.add_argument("--save_scores", action="store_true", help="also write the full score matrix to scores.h5 (for validate)")
    d = p.add_argument_group("query data options (default: the build's)")
    add_classes_argument(d, build=False)
    add_data_arguments(d)
    add_runtime_arguments(p)


def parse_damping(text: str, scorer: str) -> Any:
    if str(text) == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise CommandError(f"--damping must be 'auto' or a number > 0, got {text!r}") from None
    if not value > 0:
        raise CommandError(f"--damping must be > 0, got {value}")
    return value


def refine_options(args: argparse.Namespace) -> dict[str, Any]:
    """RefinedInfluence's stopping rule from ``--iterations`` / ``--tol`` (refused with another scorer)."""
    given = {k: v for k, v in (("iterations", args.iterations), ("tol", args.tol)) if v is not None}
    if given and args.scorer != "refined":
        raise CommandError(f"{', '.join('--' + k for k in given)} only apply to --scorer refined (got --scorer {args.scorer})")
    if given.get("iterations", 0) < 0 or given.get("tol", 0) < 0:
        raise CommandError(f"--iterations and --tol must be >= 0, got {given}")
    return given


def query_positions(n: int, indices: list[int] | None, num: int | None, flag: str = "--query_indices") -> np.ndarray:
    """Which query rows [n_q] (all, the first ``num``, or ``indices``), checked against n."""
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise CommandError(f"{flag} {bad.tolist()[:10]} outside the {n} rows of the query file")
        return idx
    if num is not None and num < 1:
        raise CommandError(f"--num_query must be >= 1, got {num}")
    return np.arange(n if num is None else min(num, n))


def warn_scorer(scorer: str, spec: Any) -> None:
    """Warn about a scorer the README calls a bad fit for the store's sketch."""
    if scorer in EKFAC_FAMILY and spec.projector in RANDOM_PROJECTORS:
        print(f"warning: --scorer {scorer} on a store sketched with a random projector ({spec.projector}, m={spec.m}) loses "
              "most of EKFAC's accuracy: the sketch's inner-product error is amplified by EKFAC's preconditioner (LDS 0.15 "
              "against 0.63 for sketched_influence at SJLT m=1024 on digits-mlp). Use --scorer sketched_influence on this "
              "store, or rebuild it with --projector identity for EKFAC (or a factorized / eigenbasis store from the Python API)",
              file=sys.stderr)


def data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Per-file data options given on this command (the build's otherwise)."""
    keys = ("text_column", "label_column", "feature_columns", "max_length", "image_size", "split")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    require(args, ("store", "query_data"), "score")
    t0 = time.perf_counter()
    damping = parse_damping(args.damping, args.scorer)
    refine = refine_options(args)
    if not Path(args.query_data).exists():
        raise CommandError(f"--query_data not found: {args.query_data}")
    if args.k < 1:
        raise CommandError(f"--k must be >= 1, got {args.k}")
    r, store = open_store(args.store, args.run_spec, resolve_device(args.device), args.batch_size, not args.no_progress,
                          args.classes)
    warn_scorer(args.scorer, r.spec)
    train = r.load_train()
    query = r.load_query(args.query_data, "--query_data", **data_overrides(args))
    qidx = query_positions(len(query), args.query_indices, args.num_query)
    check_fits(r, query, qidx, "--query_data")
    k = min(args.k, len(store))
    out = Path(args.output_dir) if args.output_dir else Path(args.store).with_name(Path(args.store).stem + "_scores")
    out.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()

    scorer, queries = _fit(args.scorer, damping, r, store, train, query, qidx, refine)
    t_fit = time.perf_counter()
    scores_path = out / "scores.h5" if args.save_scores else None
    if scores_path is not None:
        top = scorer.score_to_hdf5(queries, scores_path, k=k)
    else:
        top = scorer.top_k(queries, k=k)
    t_score = time.perf_counter()

    results = _results(top, qidx, query, train)
    lam = getattr(scorer, "damping_", None)
    settings = {"store": str(Path(args.store).resolve()), "query_data": str(query.path), "scorer": args.scorer, "k": k,
                "damping": lam if isinstance(lam, (int, float)) else (lam if isinstance(lam, dict) else args.damping),
                "n_train": int(len(store)), "n_query": int(len(qidx)), "projector": r.featurizer.projector.spec(),
                "modules": list(r.featurizer.selection().names), "model": r.spec.model, "task": r.spec.task,
                "sign": "score = predicted change of the query's measurement when the train row is up-weighted; "
                        "positive = helps the query"}
    if isinstance(scorer, RefinedInfluence):
        h = scorer.history_
        settings["refinement"] = {"iterations": scorer.iterations, "tol": scorer.tol, "ggn_products": scorer.passes_,
                                  "median_relative_residual": h.residuals if h else []}
    timings = {"load_s": t_load - t0, "fit_s": t_fit - t_load, "score_s": t_score - t_fit}
    json_path, csv_path = out / "topk.json", out / "topk.csv"
    json_path.write_text(json.dumps({"settings": settings, "results": results, "timings": timings}, indent=2))
    _write_csv(csv_path, results)
    written = [json_path, csv_path] + ([scores_path] if scores_path else [])
    written += _reports(args, out, results, query, train, settings)
    total = time.perf_counter() - t0
    print(f"scored {len(qidx)} queries x {len(store)} train rows with {args.scorer} "
          f"(damping {settings['damping'] if not isinstance(settings['damping'], dict) else 'per module'}) in "
          f"{t_score - t_load:.1f}s; total {total:.1f}s")
    if "refinement" in settings:
        res = settings["refinement"]["median_relative_residual"]
        print(f"refined with {settings['refinement']['ggn_products']} Gauss-Newton products over the training rows"
              + (f"; median relative residual {res[0]:.3g} (EKFAC) -> {res[-1]:.3g}" if res else ""))
    for path in written:
        print(f"wrote {path}")
    return {"output_dir": str(out), "files": [str(p) for p in written], "results": results, "seconds": total,
            "damping": settings["damping"]}


def _fit(kind: str, damping: Any, r: Run, store: Any, train: Any, query: Any, qidx: np.ndarray,
         refine: dict[str, Any]) -> tuple[Any, Any]:
    """(fitted scorer, queries in the form it scores: sketched rows or a dataset)."""
    if kind == "sketched_influence":

        scorer = SketchedInfluence(damping=damping, device=r.device).fit(store)
        r.use_collate(query)
        return scorer, r.featurizer.query_rows(query.dataset, qidx)

    n = r.spec.num_train
    data = train.dataset if n is None or n >= len(train) else Subset(train.dataset, range(n))
    sel = r.featurizer.selection()
    folder = Path(r.spec.store).with_name(Path(r.spec.store).stem + ".ekfac")
    r.use_collate(train)  # the scorer's query-gradient featurizer copies it: query files batch like the train file
    factors = fit_factors(r.model, r.task, data, kind="ekfac", modules=list(sel.names), batch_size=r.featurizer.batch_size,
                          path=folder, progress=r.featurizer.progress, collate_fn=train.collate_fn)
    if kind == "refined":
        scorer = RefinedInfluence(factors, r.featurizer, data, damping=damping, ggn_batch_size=r.featurizer.batch_size,
                                  **refine).fit(store)
    else:
        scorer = EKFACScorer(factors, r.featurizer, damping=damping).fit(store)
    return scorer, Subset(query.dataset, qidx.tolist())


def _results(top: Any, qidx: np.ndarray, query: Any, train: Any) -> list[dict[str, Any]]:
    def example(i: Any, s: Any) -> dict[str, Any]:
        return {"train_index": int(i), "score": float(s), "label": train.label_name(int(i))}

    return [{"query_index": int(q), "label": query.label_name(int(q)),
             "proponents": [example(i, s) for i, s in zip(top.proponents[row], top.proponent_scores[row])],
             "opponents": [example(i, s) for i, s in zip(top.opponents[row], top.opponent_scores[row])]}
            for row, q in enumerate(qidx)]


def _write_csv(path: Path, results: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_index", "query_label", "kind", "rank", "train_index", "train_label", "score"])
        for res in results:
            for kind in ("proponents", "opponents"):
                for rank, e in enumerate(res[kind], 1):
                    w.writerow([res["query_index"], res["label"], kind[:-1], rank, e["train_index"], e["label"], f"{e['score']:.9g}"])


def _reports(args: argparse.Namespace, out: Path, results: list[dict[str, Any]], query: Any, train: Any,
             settings: dict[str, Any]) -> list[Path]:
    if args.report == "none":
        return []

    shown = results[: max(0, args.report_queries)]
    reports = [QueryReport(Cell(res["query_index"], query.preview(res["query_index"])),
                           [Cell(e["train_index"], train.preview(e["train_index"]), e["score"]) for e in res["proponents"]],
                           [Cell(e["train_index"], train.preview(e["train_index"]), e["score"]) for e in res["opponents"]])
               for res in shown]
    subtitle = (f"{settings['scorer']} on {settings['n_train']} training rows ({settings['projector'].get('type')}, "
                f"m={settings['projector'].get('m', '-')}); model {settings['model']}; {len(shown)} of {len(results)} queries")
    written = []
    if args.report in ("html", "both"):
        written.append(write_html(out / "report.html", reports, subtitle=subtitle))
    if args.report in ("png", "both"):
        try:
            written.append(write_png(out / "report.png", reports))
        except ImportError as exc:
            raise CommandError(str(exc)) from exc
    return written

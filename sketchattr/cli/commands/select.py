"""``sketchattr select``: LESS-style data selection — the top ``--fraction`` of the training rows
for a target set.

Each training row's score against every target row (``--scorer cos``: cosine of the sketched
gradients, LESS, the default; ``dot``; or ``sketched_influence``) is aggregated over the targets
(``--aggregate max``, LESS, or ``mean``, :func:`~sketchattr.score.selection.aggregate_scores`)
block by block over the store, so memory stays O(n_target · block); the top ceil(fraction · n)
rows (or ``--num_select``) are chosen by :func:`~sketchattr.score.selection.select_training_data`.
For LESS proper, build the store with ``--optimizer_state`` (Adam-preconditioned gradients).

Writes ``--output`` (default ``<store stem>_selected.npy``): the chosen training-file row
indices, best first, int64 ``[k]``; the same indices one per line in ``.txt`` beside it; and
their aggregated scores in ``.csv`` (``rank,train_index,score``).
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from sketchattr.cli.commands.build import add_data_arguments
from sketchattr.cli.commands.score import data_overrides, parse_damping, query_positions
from sketchattr.cli.config import CommandError, add_config_argument, add_runtime_arguments, require, resolve_device
from sketchattr.cli.fit_checks import check_fits
from sketchattr.cli.labels import add_classes_argument
from sketchattr.cli.spec import add_store_arguments, open_store
from sketchattr.score import SketchedInfluence, TracIn
from sketchattr.score.selection import aggregate_scores, select_training_data

HELP = "LESS-style selection of the top training rows for a target set -> index file"

SCORERS = ("cos", "dot", "sketched_influence")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    add_store_arguments(p)
    p.add_argument("--target_data", help="target rows (the data to select for), a data file like the training file")
    p.add_argument("--target_indices", type=int, nargs="+", default=None, help="use only these target rows")
    p.add_argument("--fraction", type=float, default=None, help="select the top ceil(fraction * n_train) rows, 0 < fraction <= 1")
    p.add_argument("--num_select", type=int, default=None, help="select this many rows instead of a fraction")
    p.add_argument("--scorer", choices=SCORERS, default="cos", help="cos (LESS, default), dot or sketched_influence")
    p.add_argument("--aggregate", choices=("max", "mean"), default="max", help="over the targets: max (LESS) or mean")
    p.add_argument("--damping", default="auto", help="sketched_influence only: 'auto' or λ > 0")
    p.add_argument("--output", default=None, help="index file (.npy; .txt and .csv beside it)")
    d = p.add_argument_group("target data options (default: the build's)")
    add_classes_argument(d, build=False)
    add_data_arguments(d)
    add_runtime_arguments(p)


def selection_size(n: int, fraction: float | None, num: int | None) -> int:
    """ceil(fraction · n) or ``num``; exactly one of them."""
    if (fraction is None) == (num is None):
        raise CommandError("give exactly one of --fraction and --num_select")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise CommandError(f"--fraction must be in (0, 1], got {fraction} (5% is 0.05)")
        return max(1, math.ceil(fraction * n - 1e-9))
    if not 1 <= num <= n:
        raise CommandError(f"--num_select must be in [1, {n}] (the store's rows), got {num}")
    return int(num)


def run(args: argparse.Namespace) -> dict[str, Any]:

    require(args, ("store", "target_data"), "select")
    t0 = time.perf_counter()
    if args.fraction is not None:
        selection_size(1, args.fraction, None)  # a bad fraction fails before the model is loaded
    if not Path(args.target_data).exists():
        raise CommandError(f"--target_data not found: {args.target_data}")
    r, store = open_store(args.store, args.run_spec, resolve_device(args.device), args.batch_size, not args.no_progress,
                          args.classes)
    n = len(store)
    k = selection_size(n, args.fraction, args.num_select)
    target = r.load_query(args.target_data, "--target_data", **data_overrides(args))
    tidx = query_positions(len(target), args.target_indices, None, "--target_indices")
    check_fits(r, target, tidx, "--target_data")
    r.use_collate(target)
    if args.scorer == "sketched_influence":

        scorer = SketchedInfluence(damping=parse_damping(args.damping, "sketched_influence"), device=r.device).fit(store)
        queries: Any = r.featurizer.query_rows(target.dataset, tidx)
    else:

        scorer = TracIn(r.featurizer, variant=args.scorer).fit(store)
        queries = Subset(target.dataset, tidx.tolist())
    idx_blocks, agg_blocks = [], []
    for idx, block in scorer.iter_scores(queries):  # [n_target, b] per block: aggregated at once
        idx_blocks.append(np.asarray(idx))
        agg_blocks.append(aggregate_scores(block, args.aggregate).cpu())
    train_indices, agg = np.concatenate(idx_blocks), torch.cat(agg_blocks)
    chosen = select_training_data(agg[None, :], train_indices, k=k, aggregate="max")  # one row: max = itself
    out = Path(args.output) if args.output else Path(args.store).with_name(Path(args.store).stem + "_selected.npy")
    if out.suffix in (".txt", ".csv"):
        out = out.with_suffix(".npy")
    elif out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    indices = np.asarray(chosen.indices, dtype=np.int64)
    np.save(out, indices)
    txt, table = out.with_suffix(".txt"), out.with_suffix(".csv")
    txt.write_text("".join(f"{i}\n" for i in indices.tolist()))
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "train_index", "score"])
        w.writerows([rank, i, f"{s:.9g}"] for rank, (i, s) in enumerate(zip(indices.tolist(), chosen.scores.tolist()), 1))
    total = time.perf_counter() - t0
    print(f"selected {k} of {n} training rows ({k / n:.1%}) for {len(tidx)} target rows: {args.scorer} scores, "
          f"{args.aggregate} over targets, in {total:.1f}s")
    for path in (out, txt, table):
        print(f"wrote {path}")
    return {"indices": indices, "scores": torch.as_tensor(chosen.scores).cpu().numpy(), "aggregated": agg.numpy(),
            "train_indices": train_indices,
            "files": [str(out), str(txt), str(table)], "seconds": total}

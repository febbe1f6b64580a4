"""``sketchattr validate``: the linear datamodeling score (LDS) of a score file against retraining
ground truth.

Scores: ``scores.h5`` from ``sketchattr score --save_scores`` (``Scorer.score_to_hdf5``:
``scores`` [n_query, n_train] float32 and ``train_indices`` [n_train], the training-file row of
each column) or a ``.npy`` [n_query, n_train] whose column i is training row i. Ground truth: an
HDF5 cache of :mod:`sketchattr.validate.ground_truth` (``masks`` bool [K, n_train], ``outputs``
[K, n_query], ``done`` [K]; unfinished subsets are left out) or an ``.npz`` with ``masks`` and
``outputs``. Columns are placed by their training-row index; rows the score file lacks (a store
built from part of the data) count 0.

Prints the mean LDS; writes ``--output`` (default ``<scores stem>_lds.csv``): ``query,lds`` per
query (nan where a side is constant), and the same values as ``.npy`` beside it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from sketchattr.cli.config import CommandError, add_config_argument, require
from sketchattr.validate.lds import lds

HELP = "LDS of a score file against retraining ground truth"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--scores", help="scores.h5 (sketchattr score --save_scores / score_to_hdf5) or a .npy [n_query, n_train]")
    p.add_argument("--ground_truth", help="ground-truth .h5 (sketchattr.validate.ground_truth) or .npz with masks and outputs")
    p.add_argument("--output", default=None, help="per-query LDS file (.csv; a .npy is written beside it)")


def read_scores(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores [n_query, n_cols] float64, training-row index of each column [n_cols] or None = 0..n-1)."""
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"--scores file not found: {p}")
    ext = p.suffix.lower()
    if ext == ".npy":
        try:
            scores = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise CommandError(f"--scores {p} cannot be read as a plain .npy array: {exc}") from exc
        columns = None
    elif ext in (".h5", ".hdf5"):
        import h5py

        try:
            with h5py.File(p, "r") as f:
                if "scores" not in f:
                    raise CommandError(f"--scores {p} has no 'scores' dataset (found {sorted(f)}); write it with "
                                       "`sketchattr score --save_scores`")
                scores = f["scores"][()]
                columns = f["train_indices"][()] if "train_indices" in f else None
        except OSError as exc:
            raise CommandError(f"--scores {p} is not a readable HDF5 file: {exc}") from exc
    else:
        raise CommandError(f"--scores {p}: unknown extension {ext!r} (use .h5 from `sketchattr score --save_scores`, or .npy)")
    if scores.ndim != 2:
        raise CommandError(f"--scores {p}: expected a [n_query, n_train] matrix, found shape {scores.shape}")
    return scores.astype(np.float64), columns


def read_ground_truth(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool [K, n_train], outputs [K, n_query]) of the finished subsets."""
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"--ground_truth file not found: {p}")
    ext = p.suffix.lower()
    if ext == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                missing = [k for k in ("masks", "outputs") if k not in f.files]
                if missing:
                    raise CommandError(f"--ground_truth {p} lacks {missing} (found {f.files}); it needs masks [K, n_train] "
                                       "and outputs [K, n_query]")
                masks, outputs, done = f["masks"], f["outputs"], f["done"] if "done" in f.files else None
        except ValueError as exc:
            raise CommandError(f"--ground_truth {p} cannot be read as plain arrays: {exc}") from exc
    elif ext in (".h5", ".hdf5"):
        import h5py

        try:
            with h5py.File(p, "r") as f:
                missing = [k for k in ("masks", "outputs") if k not in f]
                if missing:
                    raise CommandError(f"--ground_truth {p} lacks {missing} (found {sorted(f)})")
                masks, outputs = f["masks"][()], f["outputs"][()]
                done = f["done"][()] if "done" in f else None
        except OSError as exc:
            raise CommandError(f"--ground_truth {p} is not a readable HDF5 file: {exc}") from exc
    else:
        raise CommandError(f"--ground_truth {p}: unknown extension {ext!r} (use .h5 or .npz)")
    masks, outputs = np.asarray(masks).astype(bool), np.asarray(outputs, dtype=np.float64)
    if masks.ndim != 2 or outputs.ndim != 2 or masks.shape[0] != outputs.shape[0]:
        raise CommandError(f"--ground_truth {p}: masks {masks.shape} and outputs {outputs.shape} must be [K, n_train] and [K, n_query]")
    if done is not None:
        done = np.asarray(done, dtype=bool)
        masks, outputs = masks[done], outputs[done]
    finite = np.isfinite(outputs).all(axis=1)
    return masks[finite], outputs[finite]


def align_columns(scores: np.ndarray, columns: np.ndarray | None, n_train: int) -> tuple[np.ndarray, int]:
    """Scores [n_query, n_train] with column j = training row j (absent rows 0); and how many are absent."""
    if columns is None:
        if scores.shape[1] != n_train:
            raise CommandError(f"the scores have {scores.shape[1]} columns but the ground truth {n_train} training rows")
        return scores, 0
    columns = np.asarray(columns, dtype=np.int64)
    if columns.size and (columns.min() < 0 or columns.max() >= n_train):
        raise CommandError(f"the scores name training rows up to {columns.max()}, but the ground truth has {n_train}")
    full = np.zeros((scores.shape[0], n_train))
    full[:, columns] = scores
    return full, n_train - len(np.unique(columns))


def run(args: argparse.Namespace) -> dict[str, Any]:

    require(args, ("scores", "ground_truth"), "validate")
    t0 = time.perf_counter()
    scores, columns = read_scores(args.scores)
    masks, outputs = read_ground_truth(args.ground_truth)
    if masks.shape[0] < 2:
        raise CommandError(f"--ground_truth {args.ground_truth} has {masks.shape[0]} finished subsets; LDS needs at least 2")
    if outputs.shape[1] != scores.shape[0]:
        raise CommandError(f"the scores have {scores.shape[0]} queries but the ground truth measures {outputs.shape[1]}: "
                           "score the same query rows, in the same order")
    full, absent = align_columns(scores, columns, masks.shape[1])
    result = lds(full, masks, outputs)
    out = Path(args.output) if args.output else Path(args.scores).with_name(Path(args.scores).stem + "_lds.csv")
    out = out.with_suffix(".csv") if out.suffix == ".npy" else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("query,lds\n" + "".join(f"{q},{v:.9g}\n" for q, v in enumerate(result.per_query.tolist())))
    npy = out.with_suffix(".npy")
    np.save(npy, result.per_query)
    n_nan = int((~np.isfinite(result.per_query)).sum())
    if absent:
        print(f"note: {absent} training rows have no score column (not in the store) and count 0")
    print(f"LDS {result.mean:.4f} (mean over {len(result.per_query) - n_nan} queries"
          + (f"; {n_nan} nan where a side is constant" if n_nan else "") + f"), {masks.shape[0]} subsets x {masks.shape[1]} "
          f"training rows, {time.perf_counter() - t0:.1f}s")
    print(f"wrote {out}")
    print(f"wrote {npy}")
    return {"mean": result.mean, "per_query": result.per_query, "files": [str(out), str(npy)]}

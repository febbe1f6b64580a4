"""Counterfactual ground truth for LDS: retrain on random subsets, measure query outputs, cache to HDF5.

Subset k (k = 0..K-1) holds the train positions
``np.random.RandomState(seed + k).choice(n_train, round(alpha * n_train), replace=False)``; it is trained
``n_seeds`` times with training seeds ``k * n_seeds + r`` (r = 0..n_seeds-1) and ``outputs[k]`` is the mean
of ``measure_fn(model)`` over those seeds. Each model is trained and measured with torch pinned to one
intra-op thread (bitwise the same with or without worker processes).

The HDF5 cache holds ``masks`` bool [K, n_train], ``outputs`` float64 [K, n_query], ``done`` bool [K] and the
settings as attrs. A subset is written and flushed as soon as it finishes, so an interrupted run resumes.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from sketchattr.core.threads import torch_threads

TrainFn = Callable[[np.ndarray, int], Any]  # (subset positions [m], seed) -> model
MeasureFn = Callable[[Any], torch.Tensor | np.ndarray]  # model -> [n_query]


@dataclass(frozen=True)
class GroundTruth:
    """``masks`` bool [K, n_train]; ``outputs`` float64 [K, n_query] (seed-averaged); settings in ``attrs``."""

    masks: np.ndarray
    outputs: np.ndarray
    path: Path | None = None
    attrs: dict = field(default_factory=dict)


def subset_positions(k: int, n_train: int, alpha: float, seed: int) -> np.ndarray:
    """Train positions of subset k, sorted (so training depends only on the mask; see module docstring)."""
    size = int(round(alpha * n_train))
    return np.sort(np.random.RandomState(seed + k).choice(n_train, size, replace=False))


def _subset_output(train_fn: TrainFn, measure_fn: MeasureFn, pos: np.ndarray, k: int, n_seeds: int, shared: bool = False) -> np.ndarray:
    rows = []
    with torch_threads(1):
        for r in range(n_seeds):
            model = train_fn(pos, r if shared else k * n_seeds + r)
            with torch.no_grad():
                out = measure_fn(model)
            out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            rows.append(out.astype(np.float64).reshape(-1))
    return np.mean(rows, axis=0)


_WORKER: dict = {}


def _worker_init(train_fn: TrainFn, measure_fn: MeasureFn, n_seeds: int, shared: bool) -> None:
    torch.set_num_threads(1)
    _WORKER.update(train_fn=train_fn, measure_fn=measure_fn, n_seeds=n_seeds, shared=shared)


def _worker_run(k: int, pos: np.ndarray) -> tuple[int, np.ndarray]:
    w = _WORKER
    return k, _subset_output(w["train_fn"], w["measure_fn"], pos, k, w["n_seeds"], w["shared"])


def _open_cache(path: Path, masks: np.ndarray, attrs: dict) -> h5py.File:
    f = h5py.File(path, "a")
    if "masks" not in f:
        f.attrs.update(attrs)
        f.create_dataset("masks", data=masks)
        f.create_dataset("done", data=np.zeros(len(masks), dtype=bool))
        f.flush()
        return f
    found = {key: f.attrs.get(key) for key in attrs}
    diff = {key: (attrs[key], found[key]) for key in attrs if not np.array_equal(np.asarray(found[key]), attrs[key])}
    if diff or not np.array_equal(f["masks"][()], masks):
        f.close()
        what = ", ".join(f"{k}: expected {e!r}, found {v!r}" for k, (e, v) in diff.items()) or "masks differ"
        raise ValueError(f"ground-truth cache {path} was built with other settings ({what}); use another path")
    return f


def subset_ground_truth(
    path: str | os.PathLike,
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    *,
    n_train: int,
    n_subsets: int = 100,
    alpha: float = 0.5,
    n_seeds: int = 2,
    seed: int = 0,
    attrs: dict | None = None,
    progress: bool = True,
    workers: int = 1,
    subsets: list[np.ndarray] | None = None,
    shared_seeds: bool = False,
) -> GroundTruth:
    """Compute (or resume) the subset-retraining ground truth cached at ``path`` (HDF5).

    ``attrs``: extra settings (str/number) stored with the cache and checked on reuse. ``workers`` > 1 trains
    subsets in forked processes (Linux; ``train_fn`` / ``measure_fn`` need not be picklable; serially
    where CUDA is available, since autograd's device threads make forking unsafe); results are
    identical to ``workers=1``. ``subsets``: explicit train positions per subset instead of random
    α-fractions (``n_subsets``/``alpha``/``seed`` then unused). ``shared_seeds``: train every subset with
    seeds 0..n_seeds-1 (common random numbers, for leave-one-out differences).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if subsets is not None:
        positions = [np.sort(np.asarray(p, dtype=np.int64)) for p in subsets]
        n_subsets = len(positions)
    else:
        positions = [subset_positions(k, n_train, alpha, seed) for k in range(n_subsets)]
    settings = dict(n_train=n_train, n_subsets=n_subsets, alpha=float(alpha), n_seeds=n_seeds, seed=seed)
    if shared_seeds:
        settings["shared_seeds"] = 1
    settings.update(attrs or {})
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for k, pos in enumerate(positions):
        masks[k, pos] = True

    with _open_cache(path, masks, settings) as f:
        done = f["done"][()]
        todo = [k for k in range(n_subsets) if not done[k]]
        bar = tqdm(total=n_subsets, initial=n_subsets - len(todo), desc="ground truth", disable=not progress)

        def write(k: int, row: np.ndarray) -> None:
            if "outputs" not in f:
                f.create_dataset("outputs", data=np.full((n_subsets, row.size), np.nan))
            f["outputs"][k] = row
            f["done"][k] = True
            f.flush()
            bar.update(1)

        try:
            # with CUDA available, autograd's first backward starts a thread per device, which fork cannot copy
            if workers > 1 and len(todo) > 1 and "fork" in mp.get_all_start_methods() and not torch.cuda.is_available():
                _run_parallel(todo, positions, train_fn, measure_fn, n_seeds, workers, write, shared_seeds)
            else:
                for k in todo:
                    write(k, _subset_output(train_fn, measure_fn, positions[k], k, n_seeds, shared_seeds))
        finally:
            bar.close()
        outputs = f["outputs"][()] if "outputs" in f else np.zeros((n_subsets, 0))
        stored = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return GroundTruth(masks=masks, outputs=outputs, path=path, attrs=stored)


def _run_parallel(todo, positions, train_fn, measure_fn, n_seeds, workers, write, shared=False) -> None:
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                             initargs=(train_fn, measure_fn, n_seeds, shared)) as ex:
        pending = {ex.submit(_worker_run, k, positions[k]) for k in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    write(*fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise

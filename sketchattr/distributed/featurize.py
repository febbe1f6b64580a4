"""Distributed featurization: each rank sketches a contiguous, batch-aligned shard of the rows.

With ``path`` every rank writes its own resumable HDF5 shard file and rank 0 joins them into
``path`` (see :mod:`sketchattr.distributed.shards`); without, each rank keeps its shard in
memory. Either way the returned store holds this rank's rows only: fit scorers on it with
``collective=`` (they reduce across ranks).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from sketchattr.core.batches import as_dataset
from sketchattr.core.profiler import Profiler
from sketchattr.distributed.collective import Collective, get_collective
from sketchattr.distributed.shards import check_world_size, join_store, remove_shards, shard_path
from sketchattr.featurize.featurizer import Featurizer
from sketchattr.sample import Sampler
from sketchattr.store import DiskStore, GradientStore, StoreMetadata, StoreMismatchError, make_store
from sketchattr.store.hdf5 import FORMAT, FORMAT_VERSION


def featurize(
    featurizer: Featurizer,
    dataset: Any,
    path: "str | os.PathLike[str] | None" = None,
    indices: Sequence[int] | None = None,
    sampler: "Sampler | str | None" = None,
    collective: Collective | None = None,
    overwrite: bool = False,
    store: str = "memory",
    profiler: Profiler | None = None,
    join: bool = True,
    **store_kwargs: Any,
) -> GradientStore:
    """Sketch the rows of ``dataset`` across the ranks of ``collective`` (default: the
    initialised torch.distributed world, else this process alone). Returns this rank's shard.

    path: an ``.h5`` path: rank r writes ``<stem>.rank<r>-of-<W>.h5`` (a :class:`DiskStore`,
        ``store_kwargs`` such as ``checkpoint=``/``storage_dtype=`` go to it) and rank 0 joins
        them into ``path``, readable as one single-process store. Re-running resumes every
        rank's shard; another world size raises StoreMismatchError unless ``overwrite``.
    join: False leaves the shards unjoined — for nodes that each write to a local disk: copy the
        ``<stem>.rank*-of-<W>.h5`` files into one folder, then :func:`~sketchattr.distributed.join_store`.
        Without ``path``: an in-memory shard (``store="memory"`` or ``"cpu"``).
    indices / sampler: as :meth:`Featurizer.featurize` (every rank must plan the same rows).
    profiler: records ``featurize shard``, ``wait for ranks`` and ``join`` (seconds).

    Every rank must call this with the same settings; all ranks check that their store
    metadata (model, projector, modules, task) and planned rows agree, and raise together.
    Every rank needs at least one batch: with more ranks than ``batch_size`` batches every rank
    raises ValueError (:func:`check_enough_batches`) before sketching anything.
    """
    c = collective or get_collective()
    prof = profiler or Profiler(enabled=False)
    dataset = as_dataset(dataset)
    idx, weights = featurizer.plan_rows(dataset, indices, sampler)
    meta = featurizer.metadata("train")
    c.together(lambda: _check_same_plan(c, meta, idx, weights))
    check_enough_batches(len(idx), featurizer.batch_size, c.world_size)  # same outcome on every rank
    part = c.shard(len(idx), featurizer.batch_size)
    rows, w = idx[part], None if weights is None else weights[part]
    c.activity(f"featurize: rows {part.start}..{part.stop} of {len(idx)}")
    if path is None:
        shard = make_store(store, **store_kwargs)
        with prof.record("featurize shard"):
            c.together(lambda: featurizer.featurize_rows(dataset, rows, w, shard, overwrite))
        return shard
    info = {"rank": c.rank, "world_size": c.world_size, "start": part.start, "stop": part.stop,
            "batch_size": featurizer.batch_size, "rows_sha256": _digest(idx, weights)}
    file = shard_path(path, c.rank, c.world_size)
    c.together(lambda: overwrite and c.is_main and remove_shards(path))  # before any rank reopens its file
    c.together(lambda: _open_shard(path, file, info, c.world_size, overwrite))
    shard = DiskStore(file, rank_shard=True, **store_kwargs)  # the one writer a rank shard accepts
    with prof.record("featurize shard"):
        try:
            featurizer.featurize_rows(dataset, rows, w, shard, overwrite)
            error = None
        except Exception as exc:  # noqa: BLE001 - raised on every rank by together()
            error = exc
    with prof.record("wait for ranks"):
        c.together(lambda: _raise(error))
    c.activity("featurize: waiting for the other ranks, then joining the shards")
    if join:
        with prof.record("join"):
            c.together(lambda: c.is_main and join_store(path, c.world_size, shard.checkpoint))
    c.activity("featurize: done")
    return shard


def check_enough_batches(n_rows: int, batch_size: int, world_size: int, batch_flag: str = "batch_size") -> None:
    """Raise ValueError when ``world_size`` ranks cannot each get a whole batch of ``batch_size``
    out of ``n_rows`` rows (shards are batch-aligned, so the ranks beyond the number of batches
    would hold no rows, and no scorer can be fitted on an empty shard). ``batch_flag``: the name
    of the batch-size setting in the message (e.g. a script's ``--train_batch_size``)."""
    batches = -(-n_rows // batch_size) if batch_size >= 1 else 0
    if world_size > 1 and 0 < batches < world_size:
        empty = f"rank {world_size - 1}" if batches == world_size - 1 else f"ranks {batches}..{world_size - 1}"
        fit = f" or a {batch_flag} of at most {n_rows // world_size}" if n_rows >= world_size else ""
        plural = lambda k, word: f"{k} {word}" + ("" if k == 1 else ("es" if word.endswith(("ch", "ss")) else "s"))
        raise ValueError(
            f"more ranks than batches: {world_size} ranks, but {n_rows} rows make only {plural(batches, 'batch')} "
            f"of {batch_flag} {batch_size}, so {empty} would hold no rows; use at most {plural(batches, 'process')}{fit}"
        )


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def _digest(idx: np.ndarray, weights: np.ndarray | None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes())
    if weights is not None:
        h.update(np.ascontiguousarray(weights, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _check_same_plan(c: Collective, meta: StoreMetadata, idx: np.ndarray, weights: np.ndarray | None) -> None:
    """Every rank must sketch with the same metadata and plan the same rows."""
    views = c.gather_objects((meta.to_json(), _digest(idx, weights), len(idx)))
    for rank, (text, digest, n) in enumerate(views):
        diff = StoreMetadata.from_json(views[0][0]).differences(StoreMetadata.from_json(text))
        if diff:
            raise StoreMismatchError(
                f"rank {rank} sketches with other settings than rank 0 (rank 0 = 'store', rank {rank} = "
                "'requested'):\n  " + "\n  ".join(diff) + "\nEvery rank needs the same model weights, "
                "projector, seed, modules and task."
            )
        if digest != views[0][1]:
            raise ValueError(
                f"rank {rank} planned other rows than rank 0 ({n} vs {views[0][2]}): every rank must pass "
                "the same dataset, indices and sampler (seeded)"
            )


def _open_shard(path: "str | os.PathLike[str]", file: Path, info: dict[str, Any], world_size: int, overwrite: bool) -> None:
    """Check (or create) this rank's shard file: same world size, same rows as when it was begun."""
    if not overwrite:
        check_world_size(path, world_size)
    file.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(file, "a") as f:
        if "shard" in f.attrs and not overwrite:
            saved = json.loads(f.attrs["shard"])
            diff = [f"{k}: file has {saved.get(k)!r}, this run {v!r}" for k, v in info.items() if saved.get(k) != v]
            if diff:
                raise StoreMismatchError(
                    f"shard file {file} was begun for other rows:\n  " + "\n  ".join(diff)
                    + "\nResume with the same rows, batch_size and world size, or pass overwrite=True."
                )
        f.attrs["format"], f.attrs["format_version"] = FORMAT, FORMAT_VERSION
        f.attrs["shard"] = json.dumps(info)

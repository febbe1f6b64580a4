"""Per-rank HDF5 shard files and their join into one logical file (h5py virtual datasets).

Rank r of W writes ``<stem>.rank<r>-of-<W><suffix>`` next to ``path`` (a complete
:class:`~sketchattr.store.DiskStore`, resumable on its own); rank 0 then writes ``path``
itself, a small file whose datasets are *virtual*: the ranks' datasets concatenated in rank
order (rows, indices, written, weights along rows; score matrices along train columns). Plain
h5py and :class:`~sketchattr.store.DiskStore` read it like a single-process file; the shard
files must stay beside it (they are referenced by relative name). The joined file is marked
``layout = "joined"`` and opens read-only in :class:`~sketchattr.store.DiskStore`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import h5py

from sketchattr.store import StoreMismatchError
from sketchattr.store.atomic import carry_over, temporary_beside
from sketchattr.store.hdf5 import FORMAT, FORMAT_VERSION
from sketchattr.store.shard_files import JOINED, SHARD_NAME, joined_path, rank_shard_info, shard_path

__all__ = ["check_world_size", "concat_virtual", "existing_world_sizes", "join_scores", "join_store", "joined_path",
           "missing_shards", "rank_shard_info", "remove_shards", "shard_path", "shard_paths"]


def shard_paths(path: "str | os.PathLike[str]", world_size: int) -> list[Path]:
    """The shard files of every rank, in rank order."""
    return [shard_path(path, r, world_size) for r in range(world_size)]


def existing_world_sizes(path: "str | os.PathLike[str]") -> dict[int, list[Path]]:
    """Shard files found next to ``path``, grouped by the world size in their names."""
    p = Path(path)
    found: dict[int, list[Path]] = {}
    if not p.parent.exists():
        return found
    for f in sorted(p.parent.glob(f"{p.stem}.rank*-of-*{p.suffix}")):
        match = SHARD_NAME.search(f.name[: len(f.name) - len(p.suffix)] if p.suffix else f.name)
        if match:
            found.setdefault(int(match.group(2)), []).append(f)
    return found


def check_world_size(path: "str | os.PathLike[str]", world_size: int) -> None:
    """Raise :class:`StoreMismatchError` when ``path`` has shard files of another world size
    (a resume must use the world size that wrote them)."""
    other = {w: files for w, files in existing_world_sizes(path).items() if w != world_size}
    if other:
        w, files = next(iter(sorted(other.items())))
        raise StoreMismatchError(
            f"{path} has shard files written by {w} process(es) ({files[0].name}, ...) but this run has "
            f"world size {world_size}: resume with {w} processes, or pass overwrite=True to start over"
        )


def remove_shards(path: "str | os.PathLike[str]") -> None:
    """Delete every shard file of ``path`` (any world size) and the joined file."""
    for files in existing_world_sizes(path).values():
        for f in files:
            f.unlink()
    Path(path).unlink(missing_ok=True)


def concat_virtual(
    group: h5py.Group, name: str, sources: Sequence[tuple[Path, str]], axis: int, relative_to: Path
) -> None:
    """Create ``group[name]``: the datasets ``file[dataset]`` of ``sources`` concatenated
    along ``axis`` as a virtual dataset (an ordinary empty dataset when all are empty)."""
    shapes, dtype = [], None
    for file, dset in sources:
        with h5py.File(file, "r") as f:
            shapes.append(f[dset].shape)
            dtype = f[dset].dtype
    total = list(shapes[0])
    total[axis] = sum(s[axis] for s in shapes)
    others = {tuple(s[:axis] + s[axis + 1 :]) for s in shapes}
    if len(others) != 1:
        raise StoreMismatchError(f"cannot join {name!r}: shard shapes {shapes} differ outside axis {axis}")
    if total[axis] == 0:
        group.create_dataset(name, shape=tuple(total), dtype=dtype)
        return
    layout = h5py.VirtualLayout(shape=tuple(total), dtype=dtype)
    start = 0
    for (file, dset), shape in zip(sources, shapes):
        if shape[axis] == 0:
            continue
        where = [slice(None)] * len(total)
        where[axis] = slice(start, start + shape[axis])
        layout[tuple(where)] = h5py.VirtualSource(os.path.relpath(file, relative_to), dset, shape=shape)
        start += shape[axis]
    group.create_virtual_dataset(name, layout)


def missing_shards(files: Sequence[Path]) -> None:
    """Raise FileNotFoundError naming the shard files that do not exist."""
    absent = [str(f) for f in files if not f.exists()]
    if absent:
        raise FileNotFoundError(
            f"shard file(s) missing: {absent}. Every rank must have finished its shard, and the join "
            "needs all shard files on one filesystem (join them later with join_store / join_scores)"
        )


def join_store(path: "str | os.PathLike[str]", world_size: int, checkpoint: str = "main") -> Path:
    """Write ``path``: a read-only store joining the ``world_size`` shard files' group
    ``checkpoint`` in rank order (row order of a single-process run). Returns ``path``.

    Raises FileNotFoundError for a missing shard and StoreMismatchError when shards were
    written with different metadata or are incomplete.
    """
    path = Path(path)
    files = shard_paths(path, world_size)
    missing_shards(files)
    metas, attrs = [], None
    for f in files:
        with h5py.File(f, "r") as h:
            if checkpoint not in h:
                raise StoreMismatchError(f"shard {f} has no checkpoint {checkpoint!r}")
            g = h[checkpoint]
            metas.append(g.attrs["metadata"])
            if not g["written"][:].all():
                raise StoreMismatchError(f"shard {f} is incomplete: featurize again to resume it before joining")
            attrs = attrs or dict(g.attrs)
    if len(set(metas)) != 1:
        raise StoreMismatchError(f"shard files of {path} were written with different metadata: {sorted(set(metas))}")
    tmp = temporary_beside(path)
    with h5py.File(tmp, "w") as h:
        h.attrs["format"], h.attrs["format_version"] = FORMAT, FORMAT_VERSION
        h.attrs["layout"] = JOINED
        h.attrs["shards"] = json.dumps([f.name for f in files])
        g = h.create_group(checkpoint)
        for key, value in attrs.items():
            g.attrs[key] = value
        for name in ("indices", "written", "weights", "rows"):
            concat_virtual(g, name, [(f, f"{checkpoint}/{name}") for f in files], axis=0, relative_to=path.parent)
    os.replace(tmp, path)
    return path


def join_scores(path: "str | os.PathLike[str]", world_size: int, dataset: str = "scores") -> Path:
    """Write ``path`` joining per-rank score files (``dataset`` [n_query, n_r] and
    ``train_indices`` [n_r]) along the train axis: [n_query, n_train] in rank order."""
    path = Path(path)
    files = shard_paths(path, world_size)
    missing_shards(files)
    tmp = temporary_beside(path)  # built aside and renamed: a crash during the join leaves the old file
    with h5py.File(tmp, "w") as h:
        carry_over(path, h, (dataset, "train_indices"))
        h.attrs["layout"] = JOINED
        concat_virtual(h, dataset, [(f, dataset) for f in files], axis=1, relative_to=path.parent)
        concat_virtual(h, "train_indices", [(f, "train_indices") for f in files], axis=0, relative_to=path.parent)
    os.replace(tmp, path)
    return path



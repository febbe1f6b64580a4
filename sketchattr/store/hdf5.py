"""DiskStore: sketched rows in an HDF5 file (h5py), resumable and readable with plain h5py.

Layout (one group per checkpoint / model id, default ``"main"``)::

    /                          attrs: format = "sketchattr-store", format_version = 1
    /<checkpoint>/             attrs: metadata (JSON of StoreMetadata), storage_dtype,
                                      projector_type, m, seed, model_fingerprint, task, modules,
                                      dataset_fingerprint, attrs_sha256 (JSON {attr: sha256})
    /<checkpoint>/indices      int64   [N]     dataset index of each row (planned rows included)
    /<checkpoint>/rows         f4|f2|u2 [N, m] sketched rows (u2 = bfloat16 bit patterns)
    /<checkpoint>/written      bool    [N]     True once the row's values are on disk
    /<checkpoint>/weights      float64 [N]     importance weight of each row (sampling)

All datasets are chunked, checksummed (HDF5's fletcher32 filter: a damaged chunk raises
:class:`StoreCorruptedError` naming its rows instead of returning wrong values) and resizable along N (in a file joined from per-rank shards by
:mod:`sketchattr.distributed`, root attr ``layout = "joined"``, they are read-only virtual datasets). A batch's rows are written and flushed
*before* its ``written`` flags are set and flushed, so a crash at any point leaves only rows
that are flagged complete or rows that will be recomputed; reads return flagged rows only.

The checkpoint's identity attributes carry sha256 checksums (``attrs_sha256``): a flipped bit in
them raises :class:`StoreCorruptedError` naming the attribute instead of passing for another seed.
Stores written before the checksums open with a warning and get them on their next write.
Readers of rows (:meth:`DiskStore.iter_blocks`, :attr:`DiskStore.weights`, so every scorer's fit)
refuse a store another writer holds (:class:`StoreLockedError`, even with HDF5 file locking off)
and one whose planned rows are not all written (:class:`StoreIncompleteError`) unless it was
opened with ``partial=True``. Creating a file, a checkpoint or a row index first checks free space
(as every commit does), and a new file is built aside and renamed, so a full disk leaves nothing
half made.

Its parts live beside this file: checksums and damaged chunks in :mod:`.integrity`, the writer's
lock in :mod:`.locking`, free space in :mod:`.disk_space`, the in-memory row index in :mod:`.row_index`,
the storage dtypes in :mod:`.row_encoding`.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from sketchattr.store.atomic import carry_over, temporary_beside
from sketchattr.store.base import (
    GradientStore,
    StoreCorruptedError,
    StoreIncompleteError,
    StoreLockedError,
    StoreMetadata,
    StoreMismatchError,
    StoreWriteError,
)
from sketchattr.store.disk_space import check_space, writable
from sketchattr.store.integrity import complete, read_checked, seal, verify
from sketchattr.store.locking import WriteLock
from sketchattr.store.row_encoding import STORAGE, from_storage, to_storage
from sketchattr.store.row_index import RowIndex
from sketchattr.store.shard_files import JOINED, refuse_plain_write

FORMAT = "sketchattr-store"
FORMAT_VERSION = 1
DEFAULT_PATH = Path("grad_cache") / "store.h5"
INDEX_BYTES_PER_ROW = 8 + 1 + 8  # indices int64 + written bool + weights float64 (rows are allocated when written)


class DiskStore(GradientStore, name="disk"):
    """HDF5-backed store.

    path: the ``.h5`` file (default ``grad_cache/store.h5``; folders are created).
    checkpoint: group name for this model/checkpoint's rows (several per file are allowed).
    storage_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None (default): float32 for a new
    store, the file's own for an existing one (an explicit dtype that differs is refused).
    block_bytes: size of the blocks read back by :meth:`iter_blocks` callers that ask for
    ``block_rows=None`` (bounds the memory of streaming scorers).
    buffer_bytes: rows buffered before a commit during a :meth:`writing` session (0: commit
    every write).
    lock_timeout: seconds to wait for another process's write lock (``<path>.lock``) before
    :class:`StoreLockedError` (default 0: refuse at once).
    partial: let readers (:meth:`iter_blocks`, :attr:`weights`, scorers' ``fit``) use the written
    rows of a store whose planned rows are not all written (a run cut short); default False:
    :class:`StoreIncompleteError`.
    rank_shard: internal — set by :func:`sketchattr.distributed.featurize` for the rank's own shard
    file; any other writer is refused a rank shard (it would add other ranks' rows to it).
    """

    def __init__(
        self,
        path: "str | os.PathLike[str] | None" = None,
        checkpoint: str = "main",
        storage_dtype: str | None = None,
        block_bytes: int = 64 * 2**20,
        buffer_bytes: int = 16 * 2**20,
        lock_timeout: float = 0.0,
        partial: bool = False,
        rank_shard: bool = False,
    ) -> None:
        if storage_dtype is not None and storage_dtype not in STORAGE:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE)}, got {storage_dtype!r}")
        self.requested_storage = storage_dtype  # None: float32 for a new store, the file's own otherwise
        storage_dtype = storage_dtype or "float32"
        self.path = Path(path) if path is not None else DEFAULT_PATH
        self.checkpoint = str(checkpoint)
        self.storage_dtype = storage_dtype
        self.block_bytes = int(block_bytes)
        self.metadata: StoreMetadata | None = None
        self._handle: h5py.File | None = None
        self.buffer_bytes = int(buffer_bytes)
        self.lock_timeout = float(lock_timeout)
        self.partial = bool(partial)
        self.rank_shard = bool(rank_shard)
        self._lock = WriteLock(self.path, self.lock_timeout)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_bytes = 0
        self._index: RowIndex | None = None  # the checkpoint's rows, once prepared or opened
        if self.path.exists():
            self._open_existing()

    # ------------------------------------------------------------------ file handling
    @contextmanager
    def writing(self) -> Iterator["DiskStore"]:
        """Keep the file open for writing across many :meth:`write` calls (one featurize run),
        holding the store's advisory lock (``<path>.lock``) throughout: a second writer — another
        process, even with HDF5's own file locking off (``HDF5_USE_FILE_LOCKING=FALSE``, usual on
        NFS/Lustre) — gets :class:`StoreLockedError` instead of interleaving rows."""
        if self._handle is not None:
            yield self
            return
        with self._lock.held(), self._open(write=True) as f:
            self._handle = f
            try:
                yield self
            finally:
                try:
                    self._commit()  # rows computed before an error are valid: keep them
                finally:
                    if self._handle is not f:  # replaced by _create_atomically
                        self._handle.close()
                    self._handle = None

    @contextmanager
    def _open(self, write: bool = False) -> Iterator[h5py.File]:
        """The file, open for one operation (so several stores and processes can share it
        between operations, and a crash never leaves a handle that needs cleaning), or the
        handle of an open :meth:`writing` session."""
        if self._handle is not None:
            yield self._handle
            return
        if write:
            with self._lock.held(), self._open_file(write=True) as f:
                yield f
            return
        with self._open_file(write=False) as f:
            yield f

    @contextmanager
    def _open_file(self, write: bool) -> Iterator[h5py.File]:
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():  # never a half-made file at the store's path
                self._create_atomically(None)
        try:
            f = h5py.File(self.path, "a" if write else "r")
        except OSError as exc:
            if "already open" in str(exc) or "unable to lock" in str(exc).lower():
                raise OSError(f"{self.path} is open elsewhere (another process?): {exc}") from exc
            if write and not writable(self.path):
                raise PermissionError(
                    f"{self.path} is read-only (no write permission on it or its folder, or a read-only file system): "
                    "it can be read and scored, not extended; copy it somewhere writable to add rows"
                ) from exc
            if not write and self._lock.held_elsewhere():
                raise StoreLockedError(f"{self.path} is being written by another process and cannot be read until "
                                       f"it finishes (its lock {self.path}.lock is held)") from exc
            raise StoreCorruptedError(
                f"cannot read the store file {self.path} (truncated or corrupted, e.g. by a crash during "
                f"a write): {exc}. Delete it, or use another path, to featurize again."
            ) from exc
        try:
            if write and f.attrs.get("layout") == JOINED:
                raise PermissionError(
                    f"{self.path} joins per-rank shard files (torch.distributed featurization) and is "
                    "read-only: featurize with sketchattr.distributed.featurize to add or resume rows"
                )
            if write and not self.rank_shard and ("shard" in f.attrs or ".rank" in self.path.name):
                refuse_plain_write(self.path, f.attrs)
            if write and "format" not in f.attrs:
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = FORMAT_VERSION
            elif f.attrs.get("format") != FORMAT:
                raise StoreCorruptedError(f"{self.path} is not a sketchattr store (no format attribute)")
            yield f
        finally:
            f.close()

    def _create_atomically(self, metadata: StoreMetadata | None, planned: np.ndarray | None = None) -> None:
        """A new file — the root attributes of the group-less file it replaces (if any, e.g. a rank
        shard's), and given ``metadata`` this checkpoint's group with the row index of ``planned`` —
        built under a temporary name and renamed into place after a free-space check: a crash or a
        full disk at any instant leaves the old file (or none) or the complete new one. Inside a
        :meth:`writing` session the open handle moves to the new file."""
        self._check_space(0, "creating the store")
        tmp = temporary_beside(self.path)
        reopen = self._handle is not None
        if reopen:
            self._handle.close()  # carry_over reads the file at the path
        try:
            with h5py.File(tmp, "w") as f:
                carry_over(self.path, f, ())
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = FORMAT_VERSION
                if metadata is not None:
                    self._create_group(f, metadata)
                    if planned is not None:
                        self._set_index(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
                        self._plan(f[self.checkpoint], np.asarray(planned, dtype=np.int64))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if planned is not None:  # the index planned into the file that was not renamed into place
                self._index = None
            raise
        finally:
            if reopen:
                self._handle = h5py.File(self.path, "a")

    def _fresh(self) -> bool:
        """True when the file does not exist or holds no group yet (nothing to lose by rebuilding it)."""
        if not self.path.exists():
            return True
        with self._open(write=False) as f:
            return len(f.keys()) == 0

    def _open_existing(self) -> None:
        with self._open() as f:
            if f.attrs.get("layout") == JOINED:  # virtual datasets read missing sources as zeros: check them
                absent = [s for s in json.loads(f.attrs["shards"]) if not (self.path.parent / s).exists()]
                if absent:
                    raise StoreCorruptedError(f"{self.path} joins shard files that are missing beside it: {absent}")
            if self.checkpoint not in f or not complete(f[self.checkpoint]):
                return  # absent, or cut short by a crash before any row: prepare() rebuilds it
            g = f[self.checkpoint]
            verify(g, self.path, self.checkpoint)
            try:
                self.metadata = StoreMetadata.from_json(g.attrs["metadata"])
                self.storage_dtype = str(g.attrs["storage_dtype"])
                n = g["indices"].shape[0]
                if not (g["rows"].shape[0] == g["written"].shape[0] == g["weights"].shape[0] == n):
                    raise KeyError("datasets of different lengths")
            except (KeyError, ValueError, TypeError) as exc:
                raise StoreCorruptedError(f"checkpoint {self.checkpoint!r} of {self.path} is incomplete: {exc}") from exc
            self._load_index(g)

    def checkpoints(self) -> list[str]:
        """Names of the checkpoint groups in the file."""
        with self._open() as f:
            return [k for k in f if isinstance(f[k], h5py.Group)]

    def close(self) -> None:
        """Kept for symmetry with file objects: the file is only open during an operation."""

    # ------------------------------------------------------------------ writing
    def prepare(self, metadata: StoreMetadata, planned: np.ndarray | None = None, overwrite: bool = False,
                dataset_fingerprint: str | None = None) -> None:
        with self._lock.held():
            if self._fresh():
                self._create_atomically(metadata, planned)  # the whole row index built aside, then renamed
            self._prepare_open(metadata, planned, overwrite, dataset_fingerprint)

    def _prepare_open(self, metadata: StoreMetadata, planned: np.ndarray | None, overwrite: bool,
                      dataset_fingerprint: str | None) -> None:
        with self._open(write=True) as f:
            if self.checkpoint in f and not complete(f[self.checkpoint]):
                del f[self.checkpoint]  # a group cut short by a crash before any row was written
            if self.checkpoint in f:
                if overwrite:
                    del f[self.checkpoint]
                else:
                    verify(f[self.checkpoint], self.path, self.checkpoint)
                    StoreMetadata.from_json(f[self.checkpoint].attrs["metadata"]).check_matches(metadata)
            if self.checkpoint not in f:
                self._create_group(f, metadata)
            self.metadata = metadata
            self.storage_dtype = str(f[self.checkpoint].attrs["storage_dtype"])
            if self.requested_storage is not None and self.requested_storage != self.storage_dtype and not overwrite:
                raise StoreMismatchError(
                    f"{self.path} stores rows as {self.storage_dtype}; storage_dtype={self.requested_storage!r} was "
                    "requested. Use a new path, the file's own storage dtype, or overwrite=True to discard its rows"
                )
            self._check_dataset(f[self.checkpoint], dataset_fingerprint, overwrite)
            seal(f[self.checkpoint])  # also upgrades a store written before the checksums
            self._load_index(f[self.checkpoint])
            if planned is not None:
                self._plan(f[self.checkpoint], np.asarray(planned, dtype=np.int64))

    def _check_dataset(self, g: h5py.Group, fingerprint: str | None, overwrite: bool) -> None:
        """Record the dataset's fingerprint on first use; refuse rows of another dataset after."""
        if fingerprint is None:
            return
        stored = g.attrs.get("dataset_fingerprint")
        if stored is not None and str(stored) != fingerprint and not overwrite:
            raise StoreMismatchError(
                f"{self.path} holds rows of another dataset (fingerprint {stored}, this one {fingerprint}: "
                "length and a hash of a seeded sample of examples). Use a new store, or overwrite=True"
            )
        g.attrs["dataset_fingerprint"] = fingerprint

    def _create_group(self, f: h5py.File, meta: StoreMetadata) -> None:
        self._check_space(0, f"creating checkpoint {self.checkpoint!r}")
        g = f.create_group(self.checkpoint)
        m = meta.dim
        itemsize = np.dtype(STORAGE[self.storage_dtype]).itemsize
        chunk_rows = max(1, min(4096, 2**20 // (m * itemsize)))
        # fletcher32: HDF5 checksums every chunk on write and verifies it on read (a flipped byte raises)
        g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(16384,), fletcher32=True)
        g.create_dataset("written", shape=(0,), maxshape=(None,), dtype=bool, chunks=(16384,), fletcher32=True)
        g.create_dataset("weights", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(16384,), fletcher32=True)
        g.create_dataset("rows", shape=(0, m), maxshape=(None, m), dtype=STORAGE[self.storage_dtype], chunks=(chunk_rows, m),
                         fletcher32=True)
        g.attrs["metadata"] = meta.to_json()
        g.attrs["storage_dtype"] = self.storage_dtype
        g.attrs["projector_type"] = str(meta.projector.get("type"))
        g.attrs["m"] = m
        g.attrs["seed"] = int(meta.projector.get("seed", -1))
        g.attrs["model_fingerprint"] = meta.model_fingerprint
        g.attrs["task"] = meta.task
        g.attrs["modules"] = json.dumps(meta.modules)
        seal(g)

    def _plan(self, g: h5py.Group, planned: np.ndarray) -> None:
        new = planned[~self._index.contains(planned)]
        new = new[np.sort(np.unique(new, return_index=True)[1])]  # unique, caller's order kept
        if len(new) == 0:
            return
        self._check_space(INDEX_BYTES_PER_ROW * len(new), f"the row index of {len(new)} new rows")
        n0 = g["indices"].shape[0]
        n1 = n0 + len(new)
        for name in ("indices", "written", "weights", "rows"):
            g[name].resize(n1, axis=0)
        g["indices"][n0:n1] = new
        g["written"][n0:n1] = np.zeros(len(new), dtype=bool)  # arrays, not scalars: h5py broadcasts scalars slowly
        g["weights"][n0:n1] = np.ones(len(new))
        g.file.flush()
        self._set_index(np.concatenate([self._index.indices, new]), np.concatenate([self._index.written, np.zeros(len(new), bool)]))

    def missing(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if self._index is None or len(indices) == 0:
            return indices
        return self._index.missing(indices)

    def write(self, indices: np.ndarray, rows: torch.Tensor, weights: np.ndarray | None = None) -> None:
        """Write rows; inside :meth:`writing` they are buffered up to ``buffer_bytes`` and
        committed in one go (a crash loses at most the buffer, which resume recomputes)."""
        indices = np.asarray(indices, dtype=np.int64)
        w = self._check_write(indices, rows, weights)
        if len(indices) == 0:
            return
        self._pending.append((indices, to_storage(rows, self.storage_dtype), w))
        self._pending_bytes += self._pending[-1][1].nbytes
        if self._handle is None or self._pending_bytes >= self.buffer_bytes:
            self._commit()

    def _commit(self) -> None:
        if not self._pending:
            return
        parts = list(zip(*self._pending))
        indices, data, w = (np.concatenate(p) if len(p) > 1 else p[0] for p in parts)
        self._pending, self._pending_bytes = [], 0
        self._check_space(data.nbytes + w.nbytes + indices.nbytes, "this commit")
        try:
            self._write_rows(indices, data, w)
        except OSError as exc:
            if isinstance(exc, (StoreCorruptedError, StoreLockedError)):
                raise
            raise StoreWriteError(
                f"writing {len(indices)} rows to {self.path} failed ({exc}); the {int(self._index.written.sum())} rows "
                "committed before are kept and a rerun of the same command resumes after them"
            ) from exc

    def _check_space(self, nbytes: int, what: str) -> None:
        """Refuse a write of about ``nbytes`` the disk cannot hold (:func:`~sketchattr.store.disk_space.check_space`)."""
        check_space(self.path, nbytes, what, int(self._index.written.sum()) if self._index is not None else 0)

    def _write_rows(self, indices: np.ndarray, data: np.ndarray, w: np.ndarray) -> None:
        with self._open(write=True) as f:
            g = f[self.checkpoint]
            if not self._index.contains(indices).all():
                self._plan(g, indices)
            pos = self._index.positions(indices)
            if len(pos) > 1 and not (np.diff(pos) > 0).all():
                order = np.argsort(pos)
                pos, data, w = pos[order], data[order], w[order]
            contiguous = pos[-1] - pos[0] + 1 == len(pos)
            where = slice(int(pos[0]), int(pos[-1]) + 1) if contiguous else pos  # one slice write when possible
            g["rows"][where] = data
            g["weights"][where] = w
            f.flush()  # values on disk before the flags that vouch for them
            g["written"][where] = np.ones(len(pos), dtype=bool)
            f.flush()
        self._index.written[pos] = True

    # ------------------------------------------------------------------ reading
    @property
    def indices(self) -> np.ndarray:
        if self._index is None:
            return np.zeros(0, dtype=np.int64)
        return self._index.indices[self._index.written]

    @property
    def weights(self) -> np.ndarray:
        if self._index is None:
            return np.zeros(0)
        self._check_readable()
        with self._open() as f:
            weights = read_checked(self.path, f[self.checkpoint]["weights"], 0, len(self._index.indices), self._index.indices)
            return weights[self._index.written]

    def _check_readable(self) -> None:
        """Refuse to hand out rows that are not final: another writer holds the store's lock (noticed
        even with HDF5 file locking off), or (unless ``partial``) planned rows are not written yet."""
        if self._lock.held_elsewhere():
            raise StoreLockedError(
                f"{self.path} is being written by another process (its lock {self.path}.lock is held): its rows are "
                "not final. Wait for the writer to finish, then open the store again"
            )
        if not self.partial and self._index is not None and not self._index.written.all():
            with self._open() as f:  # the index read at open may predate the writer's last rows
                self._load_index(f[self.checkpoint])
        if not self.partial and self._index is not None and not self._index.written.all():
            written = self._index.written
            raise StoreIncompleteError(
                f"{self.path} holds {int(written.sum())} of its {len(written)} planned rows (checkpoint "
                f"{self.checkpoint!r}): a featurize run was cut short (crash, max_rows, max_seconds) or is still "
                "going. Run the same featurize again to finish it (it resumes), or open the store with "
                "DiskStore(path, partial=True) to read the written rows only"
            )

    def iter_blocks(self, block_rows: int | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if self._index is None:
            return
        self._check_readable()
        if not self._index.written.any():
            return
        if block_rows is None:
            itemsize = np.dtype(STORAGE[self.storage_dtype]).itemsize
            block_rows = max(1, self.block_bytes // (self.dim * itemsize))
        n = len(self._index.indices)
        with self._open() as f:
            rows = f[self.checkpoint]["rows"]
            for s in range(0, n, block_rows):
                e = min(n, s + block_rows)
                ok = self._index.written[s:e]
                if not ok.any():
                    continue
                data = read_checked(self.path, rows, s, e, self._index.indices)
                if not ok.all():
                    data = data[ok]
                yield self._index.indices[s:e][ok], from_storage(data, self.storage_dtype)

    # ------------------------------------------------------------------ row index
    def _load_index(self, g: h5py.Group) -> None:
        n = g["indices"].shape[0]
        if n == 0:  # reading an empty chunked dataset is slow in HDF5
            self._set_index(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
        else:
            indices = read_checked(self.path, g["indices"], 0, n, None)
            self._set_index(indices, read_checked(self.path, g["written"], 0, n, indices))

    def _set_index(self, indices: np.ndarray, written: np.ndarray) -> None:
        self._index = RowIndex(indices, written)
        if not self._index.unique:
            raise StoreCorruptedError(f"checkpoint {self.checkpoint!r} of {self.path} lists a dataset index twice")

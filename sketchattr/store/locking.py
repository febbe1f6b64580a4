"""The one-writer lock of a :class:`~sketchattr.store.hdf5.DiskStore`: an advisory OS lock beside the file.

``<path>.lock`` is held for the whole of a write (an OS lock: released if the process dies), so a
second writer — another process, even with HDF5's own file locking off
(``HDF5_USE_FILE_LOCKING=FALSE``, usual on NFS/Lustre) — is refused instead of interleaving rows,
and readers can tell that a store's rows are not final yet.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from sketchattr.store.base import StoreLockedError


class WriteLock:
    """The write lock of the store file at ``path``; ``timeout``: seconds to wait for another
    process's lock before :class:`StoreLockedError` (0: refuse at once)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._lock: FileLock | None = None  # created on first use (with the folder it lives in)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block (re-entrant within this object)."""
        if self._lock is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.path) + ".lock", timeout=self.timeout)
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreLockedError(
                f"{self.path} is being written by another process (its lock {self.path}.lock is held); wait for "
                f"it to finish, or use another path (lock_timeout={self.timeout} s)"
            ) from None
        except OSError as exc:
            raise PermissionError(
                f"{self.path} cannot be written: its lock file {self.path}.lock cannot be created ({exc}); a store "
                "on a read-only folder or file system can be read and scored, not extended"
            ) from exc
        try:
            yield
        finally:
            self._lock.release()

    def held_elsewhere(self) -> bool:
        """Whether another process (or store object) holds the lock now."""
        if self._lock is not None and self._lock.is_locked:
            return False  # this object's own writing session
        if not os.path.exists(str(self.path) + ".lock"):
            return False  # never locked (and no lock file is created by a reader)
        probe = FileLock(str(self.path) + ".lock", timeout=0)
        try:
            probe.acquire()
        except Timeout:
            return True
        except OSError:  # e.g. a read-only folder: no lock can be held there
            return False
        probe.release()
        return False

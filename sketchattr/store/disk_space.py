"""What the disk allows a :class:`~sketchattr.store.hdf5.DiskStore` writer: free space and write permission.

Every write that grows the file (a commit of rows, creating the file, a checkpoint or a row
index) first checks the free space (:func:`check_space`), because HDF5 running out of space
mid-write can leave its metadata cache unflushable, crash the process and leave a file that
cannot be reopened; :func:`writable` explains a file that cannot be opened for writing.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from sketchattr.store.base import StoreWriteError

SPACE_MARGIN = 16 * 2**20  # bytes kept free beyond a commit's own (HDF5 metadata, chunk rounding)


def writable(path: Path) -> bool:
    """Whether ``path`` (or, if it does not exist, its folder) can be written."""
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        return False
    try:
        return not os.statvfs(target).f_flag & os.ST_RDONLY
    except (OSError, AttributeError):
        return True


def check_space(path: Path, nbytes: int, what: str, kept: int) -> None:
    """Refuse a write of about ``nbytes`` to the file at ``path`` (``what``: a commit, creating the
    file, a checkpoint or a row index) that the disk cannot hold; ``kept``: the rows already on disk,
    named in the error (they are kept, and a rerun resumes after them)."""
    free = shutil.disk_usage(path.parent).free
    need = 2 * nbytes + SPACE_MARGIN
    if free < need:
        raise StoreWriteError(
            f"{path}: the disk is (nearly) full — {free / 2**20:.1f} MiB free, {what} needs about "
            f"{need / 2**20:.1f} MiB. {kept} rows are on disk and kept; free space and rerun the same command "
            "to resume"
        )

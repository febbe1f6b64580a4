"""Files that appear whole or not at all: build under a temporary name beside the target, then rename.

``os.replace`` is atomic on POSIX within a folder, so a crash at any instant leaves either the old
file (or none) or the complete new one — never a half-written file at the target's path. The
temporary name carries the writer's pid; those of processes that no longer exist are removed.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py

from sketchattr.store.base import StoreCorruptedError


def temporary_beside(path: "str | os.PathLike[str]") -> Path:
    """``.<name>.<pid>.tmp`` in ``path``'s folder (created); stale ones of dead processes are deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(stale.name.rsplit(".", 2)[-2])
            if pid != os.getpid():
                os.kill(pid, 0)  # raises when no such process
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def carry_over(path: "str | os.PathLike[str]", out: h5py.File, replaced: tuple[str, ...]) -> None:
    """Copy the objects and root attributes of an existing HDF5 file at ``path`` (if any) into ``out``,
    except the names in ``replaced`` (about to be rewritten)."""
    if not os.path.exists(path):
        return
    try:
        old = h5py.File(path, "r")
    except OSError as exc:
        raise StoreCorruptedError(f"the existing file {path} cannot be read ({exc}); delete it or write to "
                                  "another path") from exc
    with old:
        for key in old:
            if key not in replaced:
                old.copy(key, out)
        for key, value in old.attrs.items():
            out.attrs[key] = value

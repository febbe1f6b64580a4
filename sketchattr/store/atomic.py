"""Files that appear whole or not at all: build under a temporary name beside the target, then rename.

``os.replace`` is atomic on POSIX within a folder, so a crash at any instant leaves either the old
file (or none) or the complete new one — never a half-written file at the target's path. The
temporary name carries the writer's pid; those of processes that no longer exist are removed.
"""
from __future__ import annotations

import os
from pathlib import Path


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

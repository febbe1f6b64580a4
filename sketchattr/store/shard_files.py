"""Which files are ranks' shards of a distributed featurization, by name and root attributes.

Rank r of W writes ``<stem>.rank<r>-of-<W><suffix>`` beside the store path (see
:mod:`sketchattr.distributed.shards`, which writes and joins them); the joined file carries the
root attribute ``layout = "joined"``. The store reads these facts to refuse a plain write into a
shard, so they live here, below both.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py

from sketchattr.store.base import StoreMismatchError

JOINED = "joined"
"""Root attribute ``layout`` of a read-only join of per-rank shard files."""
SHARD_NAME = re.compile(r"\.rank(\d+)-of-(\d+)$")
"""A shard file's stem ends with ``.rank<r>-of-<W>``."""


def shard_path(path: "str | os.PathLike[str]", rank: int, world_size: int) -> Path:
    """``dir/store.h5`` -> ``dir/store.rank<rank>-of-<world_size>.h5``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}-of-{world_size}{p.suffix}")


def joined_path(shard: "str | os.PathLike[str]") -> Path | None:
    """``dir/store.rank<r>-of-<W>.h5`` -> ``dir/store.h5`` (None for a name that is not a shard's)."""
    p = Path(shard)
    match = SHARD_NAME.search(p.stem)
    return None if match is None else p.with_name(p.stem[: match.start()] + p.suffix)


def rank_shard_info(path: "str | os.PathLike[str]", attrs: "h5py.AttributeManager") -> dict | None:
    """The shard description (``rank``, ``world_size``, ...) when the file at ``path`` (root
    attributes ``attrs``) is a rank's shard of a distributed featurization: its ``shard``
    attribute, or, for shards written before that attribute was kept, a shard name that the joined
    store beside it lists. None otherwise."""
    if "shard" in attrs:
        return json.loads(attrs["shard"])
    joined = joined_path(path)
    if joined is None or not joined.exists():
        return None
    try:
        with h5py.File(joined, "r") as h:
            listed = json.loads(h.attrs["shards"]) if h.attrs.get("layout") == JOINED else []
    except (OSError, KeyError, ValueError):
        return None
    if Path(path).name not in listed:
        return None
    match = SHARD_NAME.search(Path(path).stem)
    return {"rank": int(match.group(1)), "world_size": int(match.group(2))}


def refuse_plain_write(path: "str | os.PathLike[str]", attrs: "h5py.AttributeManager") -> None:
    """Raise :class:`StoreMismatchError` when ``path`` is a rank's shard file (see
    :func:`rank_shard_info`): only :func:`sketchattr.distributed.featurize` on the same world size
    may write it (a single-process featurize would plan every row there and damage the join)."""
    info = rank_shard_info(path, attrs)
    if info is None:
        return
    rank, world = info.get("rank"), info.get("world_size")
    rows = f" (rows {info['start']}..{info['stop'] - 1} of the plan)" if "start" in info and "stop" in info else ""
    joined = joined_path(path) or Path(path)
    raise StoreMismatchError(
        f"{path} is rank {rank}'s shard of a {world}-process distributed featurization{rows}: a single-process "
        f"featurize would add every other rank's rows to it and damage the joined store {joined.name}. Resume it "
        f"with sketchattr.distributed.featurize with the same collective (world size {world}) and "
        f"path={str(joined)!r}; to read or score the rows, open the joined store {joined.name} (join_store("
        f"{str(joined)!r}, {world}) joins finished shards) or this shard read-only"
    )

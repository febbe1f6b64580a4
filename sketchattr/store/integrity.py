"""Damage checks of a :class:`~sketchattr.store.hdf5.DiskStore` file.

The checkpoint's identity attributes (:data:`SEALED`) carry sha256 checksums of their canonical
JSON in the attribute :data:`CHECKSUMS` (:func:`seal` writes them, :func:`verify` checks them);
:func:`read_checked` reads a dataset slice and names the rows of every HDF5 chunk that fails its
fletcher32 checksum; :func:`complete` tells a whole checkpoint group from one a crash cut short.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import h5py
import numpy as np

from sketchattr.store.base import StoreCorruptedError

CHECKSUMS = "attrs_sha256"  # checkpoint attr: JSON {attribute: sha256 of its canonical JSON}
SEALED = ("metadata", "storage_dtype", "dataset_fingerprint", "projector_type", "m", "seed", "model_fingerprint",
          "task", "modules")  # the checkpoint attributes that identify its rows


def complete(g: h5py.Group) -> bool:
    """A checkpoint group has all its datasets and attributes (else a crash cut its creation short)."""
    return all(k in g for k in ("indices", "written", "weights", "rows")) and all(
        k in g.attrs for k in ("metadata", "storage_dtype", "modules"))


def digest(value: Any) -> str:
    """sha256 (hex) of an attribute value's canonical JSON (numpy scalars as Python numbers)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def seal(g: h5py.Group) -> None:
    """Write the checksums of the group's identity attributes (:data:`SEALED`) when they changed."""
    sums = json.dumps({k: digest(g.attrs[k]) for k in SEALED if k in g.attrs}, sort_keys=True)
    if g.attrs.get(CHECKSUMS) != sums:
        g.attrs[CHECKSUMS] = sums


def verify(g: h5py.Group, path: "str | os.PathLike[str]", checkpoint: str) -> None:
    """Check checkpoint group ``g`` of the file at ``path``: its identity attributes against their
    checksums (:data:`CHECKSUMS`); a group sealed by no one (an older sketchattr) only warns, to the
    caller of the store method three frames up."""
    where = f"checkpoint {checkpoint!r} of {path}"
    if CHECKSUMS not in g.attrs:
        warnings.warn(f"{where} has no checksums of its attributes (written by an older sketchattr): a damaged "
                      "bit in its metadata would go unnoticed; they are added the next time the store is written",
                      UserWarning, stacklevel=4)
        return
    try:
        sums = json.loads(g.attrs[CHECKSUMS])
        if not isinstance(sums, dict):
            raise ValueError(f"a JSON object was expected, found {type(sums).__name__}")
    except (ValueError, TypeError) as exc:
        raise StoreCorruptedError(f"{path}: attribute {CHECKSUMS!r} of checkpoint {checkpoint!r} is "
                                  f"damaged ({exc}); the store's metadata cannot be checked") from exc
    for name, expected in sums.items():
        if name not in g.attrs:
            raise StoreCorruptedError(f"{path}: attribute {name!r} of checkpoint {checkpoint!r} is "
                                      f"missing (its checksum is in {CHECKSUMS!r}); the file is damaged")
        if digest(g.attrs[name]) != expected:
            raise StoreCorruptedError(
                f"{path}: attribute {name!r} of checkpoint {checkpoint!r} does not match its sha256 "
                f"checksum (kept in attribute {CHECKSUMS!r}): the file is damaged there (e.g. a flipped bit) and "
                "its rows cannot be trusted to be what the metadata says. Featurize into a new file (or delete "
                "this one)"
            )


def read_checked(path: "str | os.PathLike[str]", dset: h5py.Dataset, s: int, e: int,
                 indices: np.ndarray | None) -> np.ndarray:
    """``dset[s:e]`` of the file at ``path``; a failed read (a chunk failing its fletcher32 checksum)
    raises StoreCorruptedError naming the dataset and the rows (and, given ``indices``, the dataset
    indices) of each damaged HDF5 chunk in ``[s, e)``."""
    try:
        return dset[s:e]
    except OSError as exc:
        step = dset.chunks[0] if dset.chunks else max(1, e - s)  # virtual datasets: the block read
        bad = []
        for a in range(s - s % step, e, step):
            b = min(a + step, dset.shape[0])
            try:
                dset[a:b]
            except OSError:
                bad.append((a, b - 1))
        bad = bad or [(s, e - 1)]
        where = ", ".join(f"rows {a}..{b}" + ("" if indices is None else
                          f" (dataset indices {int(indices[a:b + 1].min())}..{int(indices[a:b + 1].max())})")
                          for a, b in bad)
        raise StoreCorruptedError(
            f"{path}: dataset '{dset.name.lstrip('/')}', {where} fail their checksum or cannot be read "
            f"({exc}; checksums cover HDF5 chunks of {step} rows); the file is damaged there. Featurize into a "
            "new file (or delete this one) to recompute them"
        ) from exc

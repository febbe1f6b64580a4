"""Reading pickled datasets without running code from them.

Some datasets ship only as pickles (CIFAR-10's python batches, the ``mnist.pkl.gz`` of the
deeplearning.net tutorials). ``pickle.load`` on such a file runs whatever callable the file names,
so a crafted file executes code. :func:`safe_load` unpickles with an allow-list: containers,
numbers, bytes and str come from the pickle opcodes themselves, and the only callables a file may
name are numpy's array and dtype reconstructors (and ``_codecs.encode``, which protocol-2 pickles
use to spell bytes). Anything else raises :class:`UnsafePickleError`
naming the file and the refused global.
"""
from __future__ import annotations

import importlib
import pickle
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np

#: (module, name) globals a data pickle may reference: numpy array/dtype reconstruction only
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes as encode(str, "latin1")
})


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A data pickle names a global outside :data:`ALLOWED_GLOBALS` (it could run code). A
    ValueError too: a bad input file, which the ``sketchattr`` command reports as one error line."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str, **kw: Any) -> None:
        super().__init__(file, **kw)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: refused to load {module}.{name} — a data pickle may only hold arrays, numbers, "
                "bytes, str, lists, tuples and dicts; this file names other code and could run it"
            )
        if module == "_codecs":
            return importlib.import_module(module).encode
        if module.startswith("numpy") and module.endswith("multiarray"):
            with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias that old pickles name
                warnings.simplefilter("ignore", DeprecationWarning)
                return getattr(importlib.import_module(module), name)
        return getattr(np, name)


def safe_load(file: IO[bytes], source: "str | Path" = "<pickle>", encoding: str = "ASCII") -> Any:
    """``pickle.load(file, encoding=encoding)`` restricted to data (see the module docstring).
    ``source`` names the file in errors."""
    return _RestrictedUnpickler(file, str(source), encoding=encoding).load()

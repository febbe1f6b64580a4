"""Sampler base class, the :class:`Sample` record, validation helpers and factories.

A sampler picks which training rows get featurized.  ``Sampler.sample(n)`` returns a
:class:`Sample`: sorted unique dataset indices ``[k]`` plus importance weights ``[k]`` such
that, for any per-row values ``x`` (``[n, ...]``)::

    E[ sum_j sample.weights[j] * x[sample.indices[j]] ] = sum_i x[i]        # unbiased

Every random number comes from ``np.random.default_rng(seed)``: the same spec and ``n`` give
the same sample on any machine.
"""
from __future__ import annotations

import abc
import hashlib
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from sketchattr.core.checks import check_int as _check_int
from sketchattr.core.registry import Registered

__all__ = [
    "Sample",
    "Sampler",
    "make_sampler",
    "sample_from_spec",
    "dataset_labels",
]

_ALIASES = {
    "none": "all",
    "full": "all",
    "random": "uniform",
    "subsample": "uniform",
    "stratify": "stratified",
    "pps": "weighted",
    "importance": "weighted",
}


# --------------------------------------------------------------------------- the record
@dataclass(frozen=True, eq=False)
class Sample:
    """Rows chosen by a sampler.

    Attributes:
        indices: int64 ``[k]``, sorted ascending, unique dataset indices in ``[0, n)``.
        weights: float64 ``[k]``, importance weights: ``sum_j weights[j] * x[indices[j]]`` is
            an unbiased estimate of ``sum_i x[i]`` over the whole train set.
        spec: JSON-able description: the sampler's :meth:`Sampler.spec` plus ``"n"``
            (dataset size) and ``"k"`` (rows drawn), and sampler-specific extras.

    Both arrays are made read-only.
    """

    indices: np.ndarray
    weights: np.ndarray
    spec: dict

    def __post_init__(self) -> None:
        idx = np.ascontiguousarray(self.indices, dtype=np.int64)
        w = np.ascontiguousarray(self.weights, dtype=np.float64)
        if idx.ndim != 1 or w.shape != idx.shape:
            raise ValueError(
                f"indices and weights must be 1-D of equal length, got {idx.shape} and {w.shape}"
            )
        if idx.size > 1 and not np.all(idx[1:] > idx[:-1]):
            raise ValueError("indices must be sorted ascending and unique")
        idx.flags.writeable = False
        w.flags.writeable = False
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "weights", w)

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def k(self) -> int:
        """Number of rows in the sample."""
        return int(self.indices.size)

    def estimate_total(self, values: Any) -> np.ndarray:
        """``sum_j weights[j] * values[j]`` for ``values`` aligned with ``indices`` (``[k, ...]``).

        Returns the unbiased estimate of the train-set total (shape ``values.shape[1:]``).
        """
        v = _to_numpy(values)
        if v.ndim == 0 or v.shape[0] != self.k:
            raise ValueError(f"values must have leading dimension k={self.k}, got {v.shape}")
        return np.tensordot(self.weights, v.astype(np.float64, copy=False), axes=(0, 0))

    def __repr__(self) -> str:
        return f"Sample(k={self.k}, spec={self.spec!r})"


# ------------------------------------------------------------------------- validation
def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"n (the dataset size) must be an int, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise ValueError(f"the dataset is empty (n={n}); nothing to sample")
    return int(n)


def _check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise ValueError(f"rate must be a number in (0, 1], got {rate!r}")
    rate = float(rate)
    if not (0.0 < rate <= 1.0):  # also rejects NaN
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    return rate


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_keys(keys: Any, n: int, what: str = "keys") -> np.ndarray:
    """Per-example keys as a numpy array of length ``n`` (``[n]`` or ``[n, ...]``)."""
    arr = _to_numpy(keys)
    if arr.ndim == 0:
        raise ValueError(f"{what} must be a per-example array of length n={n}, got a scalar")
    if arr.shape[0] != n:
        raise ValueError(f"{what} has length {arr.shape[0]} but the dataset has n={n} rows")
    return arr


def _fingerprint(arr: np.ndarray) -> str:
    """sha256 (hex) of a numeric array's little-endian bytes plus its shape."""
    a = np.ascontiguousarray(arr)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- sampler
class Sampler(Registered, abc.ABC):
    """Chooses training rows (with importance weights) out of a dataset of ``n`` rows.

    Subclasses register with ``class Foo(Sampler, name="foo")`` and implement :meth:`_draw`.
    """

    name: ClassVar[str] = "abstract"
    registry: ClassVar[dict[str, type[Sampler]]] = {}
    kind: ClassVar[str] = "sampler"
    needs_keys: bool = False
    """True when :meth:`sample` must be given ``keys=`` (e.g. ``StratifiedSampler("labels")``)."""

    # ----------------------------------------------------------------------- public API
    def sample(self, n: int, keys: Any = None) -> Sample:
        """Draw the sample for a dataset of ``n`` rows.

        Args:
            n: dataset size (int >= 1).
            keys: optional per-example keys ``[n]`` (e.g. labels, see :func:`dataset_labels`);
                used by ``StratifiedSampler("labels")``, length-checked and otherwise ignored.
        Returns:
            :class:`Sample` with sorted unique ``indices [k]`` and ``weights [k]``.
        """
        n = _check_n(n)
        if keys is not None:
            keys = _check_keys(keys, n)
        idx, w, extra = self._draw(n, keys)
        idx = np.asarray(idx, dtype=np.int64)
        w = np.asarray(w, dtype=np.float64)
        order = np.argsort(idx, kind="stable")
        idx, w = idx[order], w[order]
        if idx.size and (idx[0] < 0 or idx[-1] >= n):  # pragma: no cover - internal invariant
            raise RuntimeError(f"{type(self).__name__} drew indices outside [0, {n})")
        spec = {**self.spec(), "n": n, "k": int(idx.size), **extra}
        return Sample(indices=idx, weights=w, spec=spec)

    def spec(self) -> dict[str, Any]:
        """JSON-able description that determines the sampler: ``{"type", "seed", ...}``."""
        return {"type": self.name}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **data: Any) -> Sampler:
        """Rebuild from :meth:`spec` (``data`` supplies non-JSON parts, e.g. ``weights=``)."""
        args = {k: v for k, v in spec.items() if k not in ("type", "n", "k")}
        return cls(**args, **data)

    def __repr__(self) -> str:
        args = {k: v for k, v in self.spec().items() if k != "type"}
        inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
        return f"{type(self).__name__}({inner})"

    # ------------------------------------------------------------------- subclass hook
    @abc.abstractmethod
    def _draw(
        self, n: int, keys: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Return ``(indices [k], weights [k], extra_spec)``; indices unique, any order."""


# -------------------------------------------------------------------------- factories
def _resolve(kind: str) -> type[Sampler]:
    key = kind.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in Sampler.registry:
        names = sorted(Sampler.registry) + [f"{a} (= {t})" for a, t in sorted(_ALIASES.items())]
        raise ValueError(f"unknown sampler {kind!r}; available: {', '.join(names)}")
    return Sampler.registry[key]


def make_sampler(kind: str | Sampler | dict | None = None, **kwargs: Any) -> Sampler:
    """Build a sampler by registry name, or pass a :class:`Sampler` through.

    Names: ``"all"`` (aliases ``"none"``, ``"full"``; also ``kind=None``), ``"uniform"``
    (``"random"``, ``"subsample"``), ``"stratified"`` (``"stratify"``), ``"weighted"``
    (``"pps"``, ``"importance"``).  ``kwargs`` go to the constructor, e.g.
    ``make_sampler("uniform", rate=0.1, seed=3)``; ``seed`` is accepted and ignored by
    ``"all"``.  A dict is read as a spec (see :func:`sample_from_spec`, ``kwargs`` = data).
    """
    if isinstance(kind, Sampler):
        if kwargs:
            raise ValueError(
                f"make_sampler got a Sampler instance and extra arguments {sorted(kwargs)}; "
                "pass either a ready sampler or a name with arguments"
            )
        return kind
    if isinstance(kind, dict):
        return sample_from_spec(kind, **kwargs)
    if kind is None:
        kind = "all"
    if not isinstance(kind, str):
        raise ValueError(
            f"kind must be a sampler name, Sampler, spec dict or None, got {type(kind).__name__}"
        )
    cls = _resolve(kind)
    if cls.name == "all":
        kwargs.pop("seed", None)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for sampler {cls.name!r}: {e}") from None


def sample_from_spec(spec: dict[str, Any], **data: Any) -> Sampler:
    """Rebuild a sampler from ``Sampler.spec()`` or ``Sample.spec`` (extra keys ``n``/``k``/...
    of a sample spec are ignored).

    Parts of a sampler that are not JSON must be passed back as ``data``: ``weights=`` for
    ``"weighted"``, ``key=`` for ``"stratified"`` built from an array or callable.  Array
    parts are checked against the fingerprint stored in the spec.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"spec must be a dict with a 'type' entry, got {spec!r}")
    return _resolve(str(spec["type"])).from_spec(spec, **data)


# ---------------------------------------------------------------------------- helpers
_DICT_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.detach().cpu().numpy()
    if isinstance(v, np.ndarray) and v.size == 1:
        return v.item()
    return v


def dataset_labels(dataset: Any) -> np.ndarray:
    """Labels ``[n]`` (or ``[n, ...]``) of a map-style dataset, e.g. as stratification keys.

    Tried in order:

    1. ``TensorDataset`` with at least two tensors: the second tensor.
    2. ``torch.utils.data.Subset``: the labels of ``dataset.dataset`` at ``dataset.indices``.
    3. a ``targets`` (torchvision style) or ``labels`` attribute of length ``len(dataset)``.
    4. iteration: ``dataset[i][1]`` for tuple/list items, or ``dataset[i][key]`` for dict
       items with a key among ``label, labels, target, targets, y``.

    Raises:
        ValueError: when none of these yields one label per row.
    """
    from torch.utils.data import Subset, TensorDataset

    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(
            f"dataset_labels needs a map-style dataset with len(); got {type(dataset).__name__}"
        ) from None
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return _to_numpy(dataset.tensors[1])
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    for attr in ("targets", "labels"):
        vals = getattr(dataset, attr, None)
        if vals is not None and not callable(vals):
            try:
                arr = _to_numpy(vals)
            except Exception:  # noqa: BLE001 - fall through to the next strategy
                continue
            if arr.ndim >= 1 and arr.shape[0] == n:
                return arr
    labels = []
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"could not read dataset[{i}] to extract labels: {e}") from e
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            labels.append(_scalar(item[1]))
        elif isinstance(item, dict) and any(k in item for k in _DICT_LABEL_KEYS):
            labels.append(_scalar(item[next(k for k in _DICT_LABEL_KEYS if k in item)]))
        else:
            raise ValueError(
                f"cannot find labels in {type(dataset).__name__}: it is not a TensorDataset "
                "with >= 2 tensors, has no 'targets'/'labels' attribute, and dataset[i] is "
                f"not an (input, label, ...) tuple or a dict with a label key (got "
                f"{type(item).__name__} at i={i}); pass keys explicitly"
            )
    try:
        return np.asarray(labels)
    except ValueError as e:
        raise ValueError(f"labels of {type(dataset).__name__} have inconsistent shapes: {e}") from e

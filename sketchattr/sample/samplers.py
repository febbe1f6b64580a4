"""The concrete samplers: ``all``, ``uniform``, ``stratified``, ``weighted``.

Drawing rules (all randomness from ``rng = np.random.default_rng(seed)``):

* ``uniform``: ``perm = rng.permutation(n)``; the sample is ``perm[:k]``.  Hence with one seed
  a smaller ``k`` gives a subset of a larger one (nested samples).
* ``stratified``: ``perm = rng.permutation(n)`` ranks every row; each stratum keeps its ``k_s``
  rows of lowest rank (uniform without replacement within the stratum, nested in ``rate``).
  With a single stratum it equals ``uniform`` with the same seed and ``k``.
* ``weighted``: see :class:`WeightedSampler` (systematic PPS, or multinomial with replacement).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sketchattr.sample.base import (
    Sampler,
    _check_int,
    _check_keys,
    _check_rate,
    _fingerprint,
    _to_numpy,
)

__all__ = [
    "AllSampler",
    "UniformSampler",
    "StratifiedSampler",
    "WeightedSampler",
    "stratum_codes",
    "inclusion_probabilities",
]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _round_count(x: np.ndarray | float) -> np.ndarray:
    """Round half to even (like Python's ``round``), as int64."""
    return np.rint(x).astype(np.int64)


# ------------------------------------------------------------------------------ all
class AllSampler(Sampler, name="all"):
    """Every row: ``indices = arange(n)``, ``weights = 1``."""

    def _draw(self, n, keys):
        return np.arange(n, dtype=np.int64), np.ones(n), {}


# -------------------------------------------------------------------------- uniform
class UniformSampler(Sampler, name="uniform"):
    """``k`` rows uniformly without replacement; weights ``n / k``.

    Args:
        rate: fraction in ``(0, 1]``; ``k = max(1, round(rate * n))`` (half to even).
        size: exact ``k`` (int >= 1, must be ``<= n`` at sampling time).
        seed: int >= 0.
    Exactly one of ``rate`` and ``size`` must be given.
    """

    def __init__(self, rate: float | None = None, size: int | None = None, seed: int = 0):
        if (rate is None) == (size is None):
            raise ValueError("UniformSampler needs exactly one of rate= or size=")
        self.rate = None if rate is None else _check_rate(rate)
        self.size = None if size is None else _check_int("size", size, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0)

    def num_rows(self, n: int) -> int:
        """``k`` for a dataset of ``n`` rows."""
        if self.size is not None:
            if self.size > n:
                raise ValueError(f"size={self.size} exceeds the dataset size n={n}")
            return self.size
        return max(1, int(_round_count(self.rate * n)))

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "rate": self.rate, "size": self.size, "seed": self.seed}

    def _draw(self, n, keys):
        k = self.num_rows(n)
        idx = _rng(self.seed).permutation(n)[:k]
        return idx, np.full(k, n / k), {}


# ----------------------------------------------------------------------- stratified
def stratum_codes(keys: Any) -> tuple[np.ndarray, int]:
    """Partition rows by key: ``(codes int64 [n], num_strata)``.

    Strata are numbered by first appearance (row 0's stratum is 0).  Keys may be any 1-D
    array-like of comparable or hashable values, or ``[n, ...]`` arrays (rows are compared
    whole).  NaN keys form one stratum.
    """
    arr = _to_numpy(keys)
    if arr.ndim == 0:
        raise ValueError("keys must be a per-example array, got a scalar")
    n = arr.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    try:
        if arr.ndim > 1:
            _, first, inv = np.unique(
                arr.reshape(n, -1), axis=0, return_index=True, return_inverse=True
            )
        else:
            _, first, inv = np.unique(arr, return_index=True, return_inverse=True)
        inv = np.asarray(inv).reshape(-1)
    except TypeError:  # mixed / unorderable objects: fall back to hashing
        table: dict[Any, int] = {}
        try:
            inv = np.array([table.setdefault(v, len(table)) for v in arr.tolist()], np.int64)
        except TypeError as e:
            raise ValueError(f"stratification keys must be hashable or comparable: {e}") from e
        return inv, len(table)
    relabel = np.empty(first.size, dtype=np.int64)
    relabel[np.argsort(first, kind="stable")] = np.arange(first.size)
    return relabel[inv], int(first.size)


class StratifiedSampler(Sampler, name="stratified"):
    """Proportional stratified sampling, uniform without replacement within each stratum.

    Stratum ``s`` of size ``n_s`` gets ``k_s = min(n_s, max(1, round(rate * n_s)))`` rows
    (at least one per stratum, half to even); its rows get weight ``n_s / k_s``.

    Args:
        key: the per-example stratification key, one of
            * an array-like ``[n]`` (labels or any hashable/comparable key; ``[n, ...]`` rows
              are compared whole),
            * a callable ``key(indices int64 [n]) -> keys [n]`` (called with ``arange(n)``),
            * ``"labels"``: keys are passed to ``sample(n, keys=...)`` by the caller
              (see :func:`~sketchattr.sample.dataset_labels`).
        rate: fraction in ``(0, 1]``.
        seed: int >= 0.

    ``Sample.spec`` adds ``"strata"`` (number of strata) and ``"key_sha256"`` (fingerprint
    of the partition, first-appearance codes).
    """

    def __init__(
        self,
        key: Any | Callable[[np.ndarray], Any] | str = "labels",
        rate: float = 0.1,
        seed: int = 0,
    ):
        self.rate = _check_rate(rate)
        self.seed = _check_int("seed", seed, minimum=0)
        self._codes: np.ndarray | None = None
        self._num_strata = 0
        if isinstance(key, str):
            if key != "labels":
                raise ValueError(
                    f"key must be an array, a callable or the string 'labels', got {key!r}"
                )
            self.key_mode = "labels"
        elif callable(key):
            self.key_mode = "callable"
        else:
            self.key_mode = "array"
            arr = _to_numpy(key)
            if arr.ndim == 0 or arr.shape[0] == 0:
                raise ValueError(
                    "key must be a non-empty per-example array (one entry per dataset row), "
                    f"a callable or 'labels'; got {key!r}"
                )
            self._codes, self._num_strata = stratum_codes(arr)
        self.key = key
        self.needs_keys = self.key_mode == "labels"

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.name, "key": self.key_mode, "rate": self.rate, "seed": self.seed
        }
        if self.key_mode == "array":
            out["n_keys"] = int(self._codes.size)
            out["key_sha256"] = _fingerprint(self._codes)
        elif self.key_mode == "callable":
            out["key_name"] = getattr(self.key, "__qualname__", type(self.key).__name__)
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **data: Any) -> StratifiedSampler:
        mode = spec.get("key", "labels")
        if mode == "labels":
            key = data.pop("key", "labels")
        elif "key" not in data:
            raise ValueError(f"a stratified spec with key={mode!r} needs key= passed back")
        else:
            key = data.pop("key")
        out = cls(key, rate=spec["rate"], seed=spec["seed"], **data)
        want = spec.get("key_sha256")
        if mode == "array" and want is not None and out.spec().get("key_sha256") != want:
            raise ValueError("the key passed back does not match the spec's key_sha256")
        return out

    def codes(self, n: int, keys: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Stratum codes ``[n]`` (first-appearance numbering) and the number of strata."""
        if self.key_mode == "labels":
            if keys is None:
                raise ValueError(
                    "StratifiedSampler(key='labels') needs sample(n, keys=labels); see "
                    "sketchattr.sample.dataset_labels"
                )
            return stratum_codes(_check_keys(keys, n))
        if keys is not None:
            raise ValueError(
                "this StratifiedSampler was built with its own key; do not also pass keys= "
                "(use key='labels' to supply keys at sampling time)"
            )
        if self.key_mode == "callable":
            return stratum_codes(
                _check_keys(self.key(np.arange(n, dtype=np.int64)), n, "key(arange(n))")
            )
        if self._codes.size != n:
            raise ValueError(f"key has length {self._codes.size} but the dataset has n={n} rows")
        return self._codes, self._num_strata

    def _draw(self, n, keys):
        codes, num = self.codes(n, keys)
        sizes = np.bincount(codes, minlength=num)
        quota = np.minimum(sizes, np.maximum(1, _round_count(self.rate * sizes)))
        rank = np.empty(n, dtype=np.int64)
        rank[_rng(self.seed).permutation(n)] = np.arange(n)
        order = np.lexsort((rank, codes))  # by stratum, then by random rank
        start = np.cumsum(sizes) - sizes
        pos = np.arange(n) - start[codes[order]]
        idx = order[pos < quota[codes[order]]]
        s = codes[idx]
        extra = {"strata": num, "key_sha256": _fingerprint(codes)}
        return idx, sizes[s] / quota[s], extra


# ------------------------------------------------------------------------- weighted
def inclusion_probabilities(weights: Any, size: int) -> np.ndarray:
    """First-order inclusion probabilities ``pi [n]`` of a PPS sample of ``size`` rows.

    ``pi_i = min(1, c * w_i)`` with ``c`` such that ``sum(pi) = size``: rows whose
    proportional share ``size * w_i / sum(w)`` reaches 1 are taken with certainty
    (``pi = 1``) and the remaining ``size - #certain`` are spread proportionally to ``w``
    over the others, repeated until no share exceeds 1.  Needs ``size <= #(w > 0)``.
    """
    w = _check_weights(weights)
    size = _check_int("size", size, minimum=1)
    if size > np.count_nonzero(w):
        raise ValueError(
            f"size={size} exceeds the number of rows with positive weight "
            f"({np.count_nonzero(w)}) for sampling without replacement"
        )
    pi = np.zeros_like(w)
    certain = np.zeros(w.shape, dtype=bool)
    while True:
        rest = ~certain & (w > 0)
        left = size - int(certain.sum())
        total = w[rest].sum()
        pi[rest] = left * w[rest] / total if left > 0 and total > 0 else 0.0
        over = rest & (pi >= 1.0)
        if not over.any():
            break
        certain |= over
        pi[certain] = 1.0
    return pi


def _check_weights(weights: Any) -> np.ndarray:
    w = _to_numpy(weights)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D array [n], got shape {w.shape}")
    if not (np.issubdtype(w.dtype, np.number) or w.dtype == bool):
        raise ValueError(f"weights must be numeric, got dtype {w.dtype}")
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite (found NaN or inf)")
    if np.any(w < 0):
        raise ValueError(f"weights must be >= 0 (found min {w.min()})")
    if not np.any(w > 0):
        raise ValueError("weights are all zero; at least one must be positive")
    return w


class WeightedSampler(Sampler, name="weighted"):
    """Probability-proportional-to-size (PPS) sampling of ``size`` rows.

    ``replace=False`` (default) — **systematic PPS on a random order** (Madow's method):
    inclusion probabilities ``pi`` are computed by :func:`inclusion_probabilities` (capped at
    1; rows with ``pi = 1`` are always taken).  The remaining rows are put in the random
    order ``rng.permutation(n)``, laid end to end as intervals of length ``pi_i`` on
    ``[0, m)`` (``m`` = rows still to draw), and the rows hit by the points ``u + j``,
    ``j = 0..m-1``, ``u = rng.random()`` are taken.  Row ``i`` is drawn with probability
    exactly ``pi_i``; exactly ``size`` distinct rows come back; weights are the
    Horvitz-Thompson ``1 / pi_i`` (unbiased).  Rows with weight 0 are never taken.

    ``replace=True`` — ``size`` multinomial draws with ``p = w / sum(w)``; duplicates are
    merged, so ``k <= size`` unique rows come back with the Hansen-Hurwitz weights
    ``count_i / (size * p_i)`` (unbiased).

    Args:
        weights: ``[n]`` non-negative finite sampling weights (not normalised).
        size: number of draws (int >= 1); without replacement at most ``#(weights > 0)``.
        seed: int >= 0.
        replace: see above.

    ``spec`` stores ``n_weights`` and ``weights_sha256`` (fingerprint of the float64 weights).
    """

    def __init__(self, weights: Any, size: int, seed: int = 0, replace: bool = False):
        self.weights = _check_weights(weights)
        self.weights.flags.writeable = False
        self.size = _check_int("size", size, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0)
        if not isinstance(replace, (bool, np.bool_)):
            raise ValueError(f"replace must be a bool, got {replace!r}")
        self.replace = bool(replace)
        if not self.replace and self.size > np.count_nonzero(self.weights):
            raise ValueError(
                f"size={self.size} exceeds the number of rows with positive weight "
                f"({np.count_nonzero(self.weights)}); use replace=True or a smaller size"
            )
        self._pi = None if self.replace else inclusion_probabilities(self.weights, self.size)

    def inclusion_probabilities(self) -> np.ndarray:
        """``pi [n]`` (without replacement) or expected draw counts ``size * p`` (with)."""
        if self.replace:
            return self.size * self.weights / self.weights.sum()
        return self._pi.copy()

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "size": self.size,
            "seed": self.seed,
            "replace": self.replace,
            "n_weights": int(self.weights.size),
            "weights_sha256": _fingerprint(self.weights),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **data: Any) -> WeightedSampler:
        if "weights" not in data:
            raise ValueError("a weighted spec needs weights= passed back")
        out = cls(
            data.pop("weights"), size=spec["size"], seed=spec["seed"],
            replace=spec.get("replace", False), **data,
        )
        want = spec.get("weights_sha256")
        if want is not None and out.spec()["weights_sha256"] != want:
            raise ValueError("the weights passed back do not match the spec's weights_sha256")
        return out

    def _draw(self, n, keys):
        if self.weights.size != n:
            raise ValueError(f"weights have length {self.weights.size} but n={n}")
        rng = _rng(self.seed)
        if self.replace:
            p = self.weights / self.weights.sum()
            counts = rng.multinomial(self.size, p)
            idx = np.flatnonzero(counts)
            return idx, counts[idx] / (self.size * p[idx]), {}
        pi = self._pi
        order = rng.permutation(n)
        u = rng.random()
        certain = np.flatnonzero(pi >= 1.0)
        cand = order[(pi[order] > 0) & (pi[order] < 1.0)]  # random order, 0 < pi < 1
        m = self.size - certain.size
        chosen = np.zeros(0, dtype=np.int64)
        if m > 0 and cand.size:
            ends = np.cumsum(pi[cand])
            ends *= m / ends[-1]  # remove rounding drift: intervals tile [0, m) exactly
            ends[-1] = m
            hits = np.searchsorted(ends, u + np.arange(m), side="right")
            chosen = np.unique(cand[np.minimum(hits, cand.size - 1)])
        idx = np.concatenate([certain, chosen])
        return idx, 1.0 / pi[idx], {}

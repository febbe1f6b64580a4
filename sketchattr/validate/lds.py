"""Linear datamodeling score (LDS).

For each query q and subset S_k, the attribution prediction is ``sum_{i in S_k} scores[q, i]``; LDS(q) is
the Spearman rank correlation over k between predictions and measured outputs f(z_q; theta_{S_k}).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class LDSResult:
    """``mean``: nan-safe mean over queries; ``per_query``: [n_query] (nan where a side is constant)."""

    mean: float
    per_query: np.ndarray


def _to_numpy(a: ArrayLike | Sequence) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def subsets_to_mask(subsets: ArrayLike | Sequence[ArrayLike], n_train: int) -> np.ndarray:
    """Bool mask [K, n_train] from a bool mask [K, n_train] or a list of K integer index arrays."""
    if isinstance(subsets, (np.ndarray, torch.Tensor)) and _to_numpy(subsets).dtype == np.bool_:
        mask = _to_numpy(subsets)
        if mask.ndim != 2 or mask.shape[1] != n_train:
            raise ValueError(f"subset mask: expected shape [K, {n_train}], found {tuple(mask.shape)}")
        return mask
    mask = np.zeros((len(subsets), n_train), dtype=bool)
    for k, idx in enumerate(subsets):
        idx = _to_numpy(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(
                f"subset {k}: expected a 1-D integer index array (or pass a bool mask [K, {n_train}]), "
                f"found dtype {idx.dtype} shape {tuple(idx.shape)}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= n_train):
            raise ValueError(f"subset {k}: indices must lie in [0, {n_train}), found [{idx.min()}, {idx.max()}]")
        mask[k, idx] = True
    return mask


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column pair of a, b [K, Q] (average ranks for ties) -> [Q]."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(0) / np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))


def lds(scores: ArrayLike, subsets: "ArrayLike | Sequence[ArrayLike] | object", outputs: ArrayLike | None = None) -> LDSResult:
    """LDS of attribution ``scores`` [n_query, n_train].

    ``lds(scores, ground_truth)`` with a :class:`~sketchattr.validate.GroundTruth`, or
    ``lds(scores, subsets, outputs)`` with ``subsets`` a bool mask [K, n_train] or a list of K
    integer index arrays into the train set and ``outputs`` [K, n_query] measured
    f(z_q; theta_{S_k}) (already averaged over seeds).
    """
    if outputs is None:
        if not (hasattr(subsets, "masks") and hasattr(subsets, "outputs")):
            raise TypeError("lds(scores, ground_truth) needs an object with .masks and .outputs, or pass outputs")
        subsets, outputs = subsets.masks, subsets.outputs
    s = _to_numpy(scores).astype(np.float64, copy=False)
    if s.ndim != 2:
        raise ValueError(f"scores: expected shape [n_query, n_train], found {tuple(s.shape)}")
    n_query, n_train = s.shape
    mask = subsets_to_mask(subsets, n_train)
    k = mask.shape[0]
    out = _to_numpy(outputs).astype(np.float64, copy=False)
    if out.shape != (k, n_query):
        raise ValueError(f"outputs: expected shape [K={k}, n_query={n_query}], found {tuple(out.shape)}")
    if k < 2:
        raise ValueError(f"need at least 2 subsets to rank, found K={k}")
    predicted = mask.astype(np.float64) @ s.T  # [K, n_query]
    per_query = _spearman_columns(predicted, out)
    finite = np.isfinite(per_query)
    mean = float(per_query[finite].mean()) if finite.any() else float("nan")
    return LDSResult(mean=mean, per_query=per_query)

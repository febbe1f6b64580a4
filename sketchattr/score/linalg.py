"""Memory-lean dense linear algebra for curvature matrices (CPU via SciPy's LAPACK/BLAS, GPU via torch)."""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas


def accumulate_gram(acc: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """acc += rowsᵀ diag(weights) rows, in place. acc [m, m], rows [b, m], weights [b].

    On CPU only the upper triangle is updated (BLAS syrk: half the flops, no [m, m] temporary);
    call :func:`symmetrize_upper` once at the end. Elsewhere the full matrix is updated.
    """
    if weights is not None:
        rows = rows * weights.sqrt().to(rows)[:, None]
    if acc.device.type == "cpu" and acc.dtype in (torch.float32, torch.float64) and acc.is_contiguous():
        syrk = blas.dsyrk if acc.dtype == torch.float64 else blas.ssyrk
        # Row-major arrays seen as Fortran arrays are transposed views (no copies):
        # a = rowsᵀ [m, b], so syrk's A·Aᵀ is rowsᵀ rows; c = accᵀ, whose upper triangle is
        # acc's lower triangle.
        a = rows.to(acc.dtype).contiguous().numpy().T
        c = acc.numpy().T
        out = syrk(1.0, a, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
        if not np.shares_memory(out, c):  # BLAS could not work in place (should not happen)
            c[...] = out
    else:
        acc.addmm_(rows.T, rows)


def symmetrize_upper(acc: torch.Tensor, block: int = 256) -> None:
    """Complete a matrix accumulated by :func:`accumulate_gram` on CPU: mirror the computed
    (row-major lower) triangle into the other, in row blocks (transients [block, m], not [m, m])."""
    if acc.device.type != "cpu":
        return
    m = acc.shape[0]
    cols = torch.arange(m)
    for s in range(0, m, block):
        e = min(m, s + block)
        above = cols[None, :] > torch.arange(s, e)[:, None]  # strictly upper part of rows s:e
        acc[s:e].copy_(torch.where(above, acc[:, s:e].T, acc[s:e]))


def eigh_ascending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix; ``matrix`` may be
    overwritten. On CPU uses LAPACK syevr in place (no n² workspace, no input copy)."""
    if matrix.device.type == "cpu" and matrix.dtype in (torch.float32, torch.float64):
        # the Fortran view of a symmetric row-major matrix is the same matrix: no layout copy
        w, v = scipy.linalg.eigh(matrix.numpy().T, overwrite_a=True, check_finite=False, driver="evr")
        return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(matrix)

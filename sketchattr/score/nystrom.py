"""Randomized Nyström eigendecomposition of F̂ streamed from a gradient store.

F̂ = Σ w_i ĝ_i ĝ_iᵀ / Σ w_i is m × m; for large m neither it nor its eigendecomposition (O(m³))
fits. Only products F̂·Q with a thin Q [m, k] are needed, and each is one pass over the store:
F̂Q = Σ_blocks Gᵀ diag(w) (G Q) / Σ w. With k = r + oversampling:

1. Q = orth(Ω), Ω Gaussian [m, k] (seeded);
2. ``power_iters`` times: Q = orth(F̂ Q) (subspace iteration: sharper for slowly decaying spectra);
3. Y = F̂ Q; stabilized Nyström (Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3):
   ν = √m·eps·‖Y‖, B = Qᵀ(Y + νQ), C = chol(B), F = (Y + νQ) C⁻ᵀ, F = U S Vᵀ,
   eigenvalues σ = max(S² − ν, 0), eigenvectors U; the top r are kept.

F̂ ≈ U diag(σ) Uᵀ is exact when r ≥ rank(F̂) (up to round-off). The pass also returns tr F̂,
so the part of the spectrum beyond the top r is known in total (the "tail"), which is what the
damping rule and d_λ need. Memory: a few [m, k] matrices (never m × m); passes: power_iters + 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

#: oversampling columns added to the rank (Halko, Martinsson & Tropp 2011 recommend 5–10)
OVERSAMPLE = 10

Pass = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # () -> iterator of (rows [b, m], weights [b])


@dataclass
class NystromResult:
    """Top-r eigenpairs of F̂ (``sigma`` [r] ascending, ``vectors`` [m, r]) and ``trace`` = tr F̂."""

    sigma: torch.Tensor
    vectors: torch.Tensor
    trace: float
    passes: int


def fhat_times(blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], Q: torch.Tensor, weight_sum: float,
               reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> tuple[torch.Tensor, float, torch.dtype]:
    """(F̂ Q [m, k], tr F̂, the products' dtype) in one pass over ``blocks`` of (rows [b, m], weights [b]).

    Products run in the rows' precision (float32 stores: float32 matmuls) and are accumulated in
    Q's dtype. ``reduce`` sums the partial results over ranks (identity in one process)."""
    out = torch.zeros_like(Q)
    trace = torch.zeros((), dtype=Q.dtype, device=Q.device)
    work = Q.dtype
    for rows, w in blocks:
        rows = rows.to(Q.device)
        work = rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32
        rows = rows.to(work)
        wb = w.to(device=Q.device, dtype=work)
        proj = (rows @ Q.to(work)) * wb[:, None]  # [b, k]
        out += (rows.T @ proj).to(Q.dtype)
        trace += (wb * (rows * rows).sum(dim=1)).sum().to(Q.dtype)
    out, trace = reduce(out), reduce(trace)
    return out / weight_sum, float(trace) / weight_sum, work


def nystrom_eigh(
    one_pass: Pass,
    m: int,
    rank: int,
    weight_sum: float,
    power_iters: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: "torch.device | str" = "cpu",
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    progress: bool = False,
) -> NystromResult:
    """Top-``rank`` eigenpairs of F̂ from ``power_iters + 1`` passes of ``one_pass()`` (see the module
    docstring). ``rank`` is capped at m; the seeded Ω makes the result identical on every rank."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if power_iters < 0:
        raise ValueError(f"power_iters must be >= 0, got {power_iters}")
    rank = min(rank, m)
    k = min(m, rank + OVERSAMPLE)
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q = _orth(torch.randn(m, k, generator=g, dtype=dtype).to(device))
    bar = tqdm(total=power_iters + 1, desc="Nyström passes over the store", disable=not progress, leave=False)
    for _ in range(power_iters):
        Y, _, _ = fhat_times(one_pass(), Q, weight_sum, reduce)
        Q = _orth(Y)
        bar.update(1)
    Y, trace, work = fhat_times(one_pass(), Q, weight_sum, reduce)
    bar.update(1)
    bar.close()
    # shift ν: a multiple of the products' round-off (float32 stores: float32 eps), raised until the
    # Cholesky factor exists (rank-deficient F̂ in finite precision)
    norm = float(torch.linalg.matrix_norm(Y, ord=2))
    nu = max((m**0.5) * torch.finfo(work).eps * norm, torch.finfo(dtype).tiny)
    for _ in range(12):
        Yn = Y + nu * Q
        B = Q.T @ Yn
        C, info = torch.linalg.cholesky_ex((B + B.T) / 2)
        if int(info) == 0:
            break
        nu *= 10
    else:
        raise RuntimeError("Nyström: Qᵀ F̂ Q is not positive definite even with a shift; are the store rows finite?")
    F = torch.linalg.solve_triangular(C, Yn.T, upper=False).T  # Yn C⁻ᵀ  [m, k]
    U, S, _ = torch.linalg.svd(F, full_matrices=False)
    sigma = (S**2 - nu).clamp(min=0)
    # descending from svd -> keep the top r, return ascending like eigh
    return NystromResult(sigma=sigma[:rank].flip(0).contiguous(), vectors=U[:, :rank].flip(1).contiguous(),
                         trace=trace, passes=power_iters + 1)


def completed_spectrum(top: torch.Tensor, trace: float, full_rank: int) -> torch.Tensor:
    """The top-r eigenvalues (ascending) with the unseen tail filled in, for d_λ and the damping rule.

    The tail holds ``full_rank − r`` eigenvalues (full_rank ≤ min(n, m) bounds rank F̂) summing to
    tr F̂ − Σ top; each gets their mean, capped at the smallest top eigenvalue. Spreading the tail
    evenly gives an upper bound on its share of d_λ (x/(x+λ) is concave). -> [full_rank] ascending."""
    r = top.numel()
    rest = max(full_rank - r, 0)
    tail_trace = trace - float(top.sum())
    if rest == 0 or tail_trace <= 0:
        return top
    level = min(tail_trace / rest, float(top.min()) if r else tail_trace / rest)
    return torch.cat([torch.full((rest,), level, dtype=top.dtype, device=top.device), top])


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q

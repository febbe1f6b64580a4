"""Choosing the damping λ without ground truth."""
from __future__ import annotations

import torch

#: fraction of σ_max used by the spectral floor of the auto rule (calibrated on digits-mlp)
AUTO_RELATIVE_FLOOR = 2e-3
#: the auto rule keeps d_λ at most m / AUTO_SKETCH_RATIO (sketch stays faithful)
AUTO_SKETCH_RATIO = 4.0


def effective_dimension(sigma: torch.Tensor, lam: float) -> float:
    """d_λ = Σ_k σ_k / (σ_k + λ) for eigenvalues σ of F."""
    sigma = sigma.clamp(min=0)
    return float((sigma / (sigma + lam)).sum())


def lambda_for_effective_dimension(sigma: torch.Tensor, target: float) -> float:
    """The λ > 0 with d_λ = target (bisection in log λ; d_λ is decreasing in λ)."""
    sigma = sigma.clamp(min=0).double()
    smax = float(sigma.max())
    if smax <= 0:
        raise ValueError("F̂ is zero: all sketched gradients vanish")
    if target >= effective_dimension(sigma, smax * 1e-14):
        return smax * 1e-14
    lo, hi = -14.0, 8.0  # log10(λ / σ_max)
    for _ in range(80):
        mid = (lo + hi) / 2
        if effective_dimension(sigma, smax * 10**mid) > target:
            lo = mid
        else:
            hi = mid
    return smax * 10**hi


def auto_damping(sigma: torch.Tensor, m: int) -> float:
    """The ``damping="auto"`` rule: λ = max(2e-3·σ_max, λ_m) where d_{λ_m} = m / 4.

    Needs only the eigenvalues σ of F̂ (no ground truth). Two terms:

    * a spectral floor 2e-3·σ_max. σ_max is preserved by any sketch, so this term does not drift
      with m (the Kronfluence-style 0.1·mean eigenvalue does: tr F̂ / m shrinks as m grows).
      The constant is calibrated, not derived: on digits-mlp LDS peaks on a plateau between
      1e-3 and 3e-3·σ_max for every sketch type and size and for three model seeds, and 2e-3 is
      its geometric middle. Check it on your own setting with experiments/hyperparam_selection.py;
    * a sketch-faithfulness term: the (1±ε) bound of a sketch of size m holds for effective
      dimensions up to a fraction of m (ε₉₅ ≈ 0.2 at m = 4·d_λ when ε₉₅ ∝ (d_λ/m)^½ with the
      prototype's 0.12 at 11·d_λ). When the floor would leave d_λ above m/4, λ is raised
      until d_λ = m/4: with a small sketch, bias from more damping beats noise from distortion.

    On digits-mlp (benchmarks/lds_digits.py) this lands within 0.005 LDS of the best λ of a
    log-grid from m = 256 to unsketched; see the README's table.
    """
    floor = AUTO_RELATIVE_FLOOR * float(sigma.max())
    return max(floor, lambda_for_effective_dimension(sigma, m / AUTO_SKETCH_RATIO))

"""(1±ε) spectrum-bound checks: is a sketch faithful to the regularized inverse Fisher?

For a gradient g, φ_λ(g) = gᵀ(F + λI)⁻¹g with F from the unsketched train gradients, and
φ̃_λ(g) = ĝᵀ(F̂ + λI)⁻¹ĝ with F̂ from the sketched ones (ĝ = Pg). The theory of sketched influence
(Hu, Hu, Ma, Zhao 2026) bounds the ratio φ̃_λ/φ_λ within 1 ± ε for m = O(ε⁻²(d_λ + log 1/δ)).
Both sides are computed with :class:`~sketchattr.score.SketchedInfluence` fits, so the exact side
can use the n×n Gram path when d is too large for a d×d matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sketchattr.score import QueryRows, SketchedInfluence
from sketchattr.score.damping import effective_dimension

#: ε₉₅ ≈ EPS95_SCALE · (d_λ / m)^½, fitted on digits-mlp with all three projector types
#: (experiments/spectrum_bounds.py at λ = 1e-3 and 1e-2·σ_max: 0.40 Gaussian, 0.45 Rademacher,
#: 0.43 SJLT; the largest is used).
EPS95_SCALE = 0.45


def _vouched(rows: "torch.Tensor | QueryRows") -> QueryRows:
    """Rows given to the validation functions are sketched by the scorer they come with (their
    contract); rows that carry their sketch are still checked."""
    return rows if isinstance(rows, QueryRows) else QueryRows.unchecked(rows)


def quadratic_forms(scorer: SketchedInfluence, rows: "torch.Tensor | QueryRows", damping: float) -> torch.Tensor:
    """φ_λ(g) = gᵀ(F + λI)⁻¹g for each row g of ``rows`` [n, m] (sketched like the scorer's store). -> [n]"""
    rows = _vouched(rows)
    return (rows.rows.to(device=scorer._vecs.device, dtype=scorer.dtype) * scorer.precondition(rows, damping)).sum(dim=1)


def bilinear_forms(scorer: SketchedInfluence, a: "torch.Tensor | QueryRows", b: "torch.Tensor | QueryRows", damping: float) -> torch.Tensor:
    """B_λ(a_i, b_j) = a_iᵀ(F + λI)⁻¹b_j. a [na, m], b [nb, m] -> [na, nb]"""
    return scorer.precondition(_vouched(a), damping) @ _vouched(b).rows.to(device=scorer._vecs.device, dtype=scorer.dtype).T


@dataclass(frozen=True)
class SpectrumCheck:
    """Result of comparing a sketch with the exact regularized form at one λ.

    ratios: φ̃_λ/φ_λ per test gradient [n]; epsilon_95: 95th percentile of |ratio − 1|;
    pairwise_epsilon_95: 95th percentile of |B̃_λ(g,g′) − B_λ(g,g′)| / √(φ_λ(g) φ_λ(g′)) over
    pairs g ≠ g′; d_lambda: effective dimension of the exact F at λ; m: sketch size.
    """

    ratios: np.ndarray
    epsilon_95: float
    pairwise_epsilon_95: float
    d_lambda: float
    m: int
    damping: float


def spectrum_check(
    exact: SketchedInfluence,
    exact_rows: torch.Tensor,
    sketch: SketchedInfluence,
    sketch_rows: torch.Tensor,
    damping: float,
    max_pairs: int = 200,
) -> SpectrumCheck:
    """Compare sketched and exact forms on test gradients.

    exact / sketch: scorers fitted on the unsketched and on the sketched train rows.
    exact_rows [n, d] / sketch_rows [n, m]: the same test gradients, unsketched and sketched.
    damping: the absolute λ used on both sides. Pairs use the first ``max_pairs`` gradients.
    """
    if exact_rows.shape[0] != sketch_rows.shape[0] or exact_rows.shape[0] < 2:
        raise ValueError(f"need the same ≥ 2 test gradients on both sides, got {exact_rows.shape[0]} and {sketch_rows.shape[0]}")
    phi = quadratic_forms(exact, exact_rows, damping).cpu()
    phi_s = quadratic_forms(sketch, sketch_rows, damping).cpu()
    ratios = (phi_s / phi).numpy()
    k = min(max_pairs, exact_rows.shape[0])
    b = bilinear_forms(exact, exact_rows[:k], exact_rows[:k], damping).cpu()
    b_s = bilinear_forms(sketch, sketch_rows[:k], sketch_rows[:k], damping).cpu()
    norm = torch.sqrt(phi[:k, None] * phi[None, :k])
    off = ~torch.eye(k, dtype=torch.bool)
    pair_err = ((b_s - b).abs() / norm)[off].numpy()
    return SpectrumCheck(
        ratios=ratios,
        epsilon_95=float(np.quantile(np.abs(ratios - 1), 0.95)),
        pairwise_epsilon_95=float(np.quantile(pair_err, 0.95)),
        d_lambda=effective_dimension(exact._sigma, damping),
        m=int(sketch.dim),
        damping=float(damping),
    )


def exact_effective_dimension(train_rows: torch.Tensor, damping: float) -> float:
    """d_λ of F = GᵀG/n from unsketched train gradients G [n, d], through the n×n Gram matrix
    (its nonzero eigenvalues are F's), in float64."""
    g = train_rows.double()
    sigma = torch.linalg.eigvalsh(g @ g.T / g.shape[0])
    return effective_dimension(sigma, damping)


def recommend_sketch_size(d_lambda: float, epsilon: float = 0.1, delta: float = 0.05, scale: float = EPS95_SCALE) -> int:
    """Sketch size m for a (1±ε) bound holding for 95% of test gradients.

    m = ⌈scale² · (d_λ + log(1/δ)) / ε²⌉, the theory's O(ε⁻²(d_λ + log 1/δ)) with the constant
    calibrated on digits-mlp (ε₉₅ ≈ 0.45·(d_λ/m)^½, see ``EPS95_SCALE``): ε = 0.1 gives
    m ≈ 20·d_λ.
    """
    if d_lambda <= 0 or not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError(f"need d_lambda > 0, 0 < epsilon < 1, 0 < delta < 1; got {d_lambda}, {epsilon}, {delta}")
    return int(math.ceil(scale**2 * (d_lambda + math.log(1 / delta)) / epsilon**2))

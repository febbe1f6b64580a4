"""Choosing the damping λ without ground truth."""
from __future__ import annotations

import math

import torch

#: the auto rule keeps d_λ at most m / AUTO_SKETCH_RATIO (the sketch stays faithful)
AUTO_SKETCH_RATIO = 3.0


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


#: an eigenvalue of F̂ holding more than this share of the (remaining) trace is a spike, not noise
SPIKE_SHARE = 0.5


def noise_level(sigma: torch.Tensor, n: int) -> float:
    """The per-row energy tr F̂ / n, leaving out spikes: eigenvalues that alone hold more than half
    of the trace left after the larger ones (at most a few; none on most models).

    A spike is one direction shared by a cluster of rows with large gradients (e.g. a handful of
    confidently misclassified examples): signal, not noise, yet it can carry most of tr F̂ and would
    set λ far too high. On the digits CNN, model seed 2, one direction holds 78% of the trace; with it
    in the noise level d_λ falls to 25 (the grid's best is 50–75) and the LDS 0.04–0.06 below the best.
    sigma: F̂'s eigenvalues [r] (any order); n: the number of train rows."""
    s = torch.sort(sigma.clamp(min=0).double(), descending=True).values
    rest = float(s.sum())
    for value in s[:-1].tolist():
        if value <= SPIKE_SHARE * rest:
            break
        rest -= value
    return rest / n


#: random halves averaged by :func:`reproducible_dimension`
REPRODUCIBILITY_SPLITS = 4


def reproducible_dimension(gram: torch.Tensor, weights: torch.Tensor, splits: int = REPRODUCIBILITY_SPLITS,
                           seed: int = 0) -> float:
    """How many directions of F̂ the training rows agree on: split the rows into random halves A and
    B; for each eigendirection v_k of F̂_A (eigenvalue σ_k) measure its curvature in the other half,
    ρ_k = v_kᵀ F̂_B v_k, and count Σ_k min(1, ρ_k / σ_k); mean over ``splits`` random halves.

    A direction carried by a structure the data share (a class, a frequent pattern) has ρ_k ≈ σ_k
    and counts 1; a direction that is the idiosyncrasy of a few rows of A (nearly orthogonal rows,
    as language-model sequence gradients are) has ρ_k ≈ 0 and counts nothing. No ground truth: the
    train rows only. On the transformer bench ~50 of 400 directions reproduce (the grid's best λ has
    d_λ = 67–94, the noise level 170); on the digits classifiers ~240–490 of 1,000 do (their best
    d_λ, 43–75, is set by the noise level instead).

    gram: H Hᵀ of the weighted rows H = √w ⊙ G, [n, n]; weights: w [n]. F̂_A = H_Aᵀ H_A / Σ_A w.
    """
    n = gram.shape[0]
    gram, weights = gram.double(), weights.double().to(gram.device)
    gen = torch.Generator().manual_seed(seed)
    counts = []
    for _ in range(splits):
        perm = torch.randperm(n, generator=gen).to(gram.device)
        a, b = perm[: n // 2], perm[n // 2:]
        wa, wb = float(weights[a].sum()), float(weights[b].sum())
        sig, u = torch.linalg.eigh(gram[a][:, a] / wa)
        keep = sig > 1e-10 * sig.max()
        sig, u = sig[keep], u[:, keep]
        rho = ((gram[b][:, a] @ u) ** 2).sum(0) / (wa * sig * wb)  # v_k = H_Aᵀ u_k / √(w_A σ_k)
        counts.append(float((rho / sig).clamp(0, 1).sum()))
    return sum(counts) / len(counts)


def auto_damping(sigma: torch.Tensor, m: int, n: int, reproducible: float | None = None) -> float:
    """The ``damping="auto"`` rule: λ = max(tr F̂ / n, λ_m) where d_{λ_m} = m / 3.

    Needs only the eigenvalues σ of F̂ (their sum, tr F̂, suffices for the first term), the number
    of train rows n and the sketch size m (no ground truth). Two terms:

    * **the noise level tr F̂ / n**: F̂ = (1/n) Σ ĝ_i ĝ_iᵀ is estimated from n rows. If the rows were
      isotropic noise of the same total energy, every nonzero eigenvalue of F̂ would sit near
      tr F̂ / min(n, m) (the Marchenko–Pastur bulk when m ≫ n); directions whose eigenvalue falls
      below the per-row energy tr F̂ / n = mean ‖ĝ_i‖² / n — the curvature a single training row
      contributes — cannot be told from noise, so λ damps them. The scale follows the data: on the
      digits MLP/CNN it lands at λ ≈ 4e-3·σ_max, on the transformer bench at ≈ 0.1·σ_max, near
      where the best λ of each sits (a fixed fraction of σ_max, the previous rule, was 0.03–0.13 LDS
      short on the transformer and the MNIST MLP). Spikes are left out of the trace
      (:func:`noise_level`);
    * **a sketch-faithfulness floor**: the (1±ε) bound of a sketch of size m holds for effective
      dimensions up to a fraction of m, so λ is raised until d_λ ≤ m / 3: with a small sketch, bias
      from damping beats noise from distortion (the 3 is where LDS peaked at m = 256 on the MLPs);
    * **a reproducibility floor** (when ``reproducible`` is given, on the Gram path): λ is raised
      until d_λ is at most the number of directions the two halves of the training rows agree on
      (:func:`reproducible_dimension`). It binds where the rows are nearly orthogonal (the
      transformer bench: d_λ 170 → ~50) and nowhere on the classifiers.

    Measured against the best λ of a fine grid (``experiments/damping_rule.py``: digits MLP, digits
    CNN, MNIST MLP, transformer; exact and SJLT/Gaussian sketches; model seeds 0–3): see the tables
    in docs/damping.md. The transformer's sketched stores want far more damping (sketch noise dominates their
    inner products): :func:`sketch_noise_damping` (``SketchedInfluence.calibrate_damping(queries)``)
    corrects for that noise.
    """
    if n < 1:
        raise ValueError(f"n (train rows) must be >= 1, got {n}")
    sigma = sigma.clamp(min=0)
    lam = max(noise_level(sigma, n), lambda_for_effective_dimension(sigma, m / AUTO_SKETCH_RATIO))
    if reproducible is not None:
        lam = max(lam, lambda_for_effective_dimension(sigma, max(reproducible, 1.0)))
    return lam


#: the sketch-noise calibration tries λ = λ_auto·10^(k/4), k = 0…16
SKETCH_NOISE_STEPS = 16


def sketch_noise_damping(sigma: torch.Tensor, row_coords: torch.Tensor, query_coords: torch.Tensor,
                         outside: torch.Tensor, m: int, lam: float) -> float:
    """λ ≥ ``lam`` that keeps a random sketch's noise out of the scores (no ground truth).

    A query's gradient q = q_∥ + q_⊥ splits into its part in the span of the train gradients and the
    rest. Exactly, q_⊥ never scores (F̂ maps the span to itself). A random sketch of size m leaks
    ~‖q_⊥‖²/m of Sq_⊥'s energy into each eigendirection of F̂, where (F̂ + λI)⁻¹ amplifies it by
    1/(σ_k + λ): noise of covariance (‖q_⊥‖²/m) Σ_k σ_k / ((σ_k+λ)(σ_k+λ')) across the train rows.
    Language models, whose sequence gradients are nearly orthogonal, have most of q outside the span
    (60% on the transformer bench) and suffer; classifiers' queries lie in the span (99%) and do not.
    Over λ = lam·10^(k/4), k = 0…16, the rule picks the λ whose (noisy) scores correlate best, mean over
    queries, with the noise-free scores at ``lam`` (noise covariances subtracted): no change where the
    noise is negligible, damping towards the dot product where it dominates.

    The target, the noise-free scores at ``lam``, is only as good as ``lam``: started from the noise
    level alone (d_λ ≈ 170 on the transformer bench, against a best of 67–94 on its exact store) the
    rule stopped 0.007–0.014 LDS short; from the reproducibility floor of :func:`auto_damping`
    (d_λ ≈ 50) every sketch of that bench (SJLT and Gaussian, m = 1,024 … 4,096, model seeds 0–3)
    lands within 0.007 of its grid's best. The classifiers, whose leak is 1% of the query energy,
    keep their λ exactly.

    sigma: F̂'s nonzero eigenvalues [r]; row_coords: the train rows in F̂'s eigenbasis [n, r];
    query_coords: the queries' [n_query, r]; outside: the queries' energy outside the span, ‖q_⊥‖²,
    [n_query] (estimated from the sketch, see :meth:`SketchedInfluence.calibrate_damping`).
    """
    sig = sigma.double()

    def centred(l: float) -> torch.Tensor:
        s = (query_coords / (sig + l)) @ row_coords.T
        return s - s.mean(dim=1, keepdim=True)

    leak = outside / m  # energy the sketch leaks into each eigendirection of F̂

    def noise(l: float, l0: float) -> torch.Tensor:
        return leak * float((sig / ((sig + l) * (sig + l0))).sum())

    base = centred(lam)
    base_var = ((base ** 2).mean(dim=1) - noise(lam, lam)).clamp(min=1e-300)
    best, best_corr = lam, -float("inf")
    for k in range(SKETCH_NOISE_STEPS + 1):
        l = lam * 10 ** (k / 4)
        s = centred(l)
        corr = float((((s * base).mean(dim=1) - noise(l, lam)) / torch.sqrt(base_var * (s ** 2).mean(dim=1))).mean())
        if corr > best_corr:
            best, best_corr = l, corr
    return best

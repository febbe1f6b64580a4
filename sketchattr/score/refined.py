"""Refined influence: EKFAC's inverse-Hessian product corrected by the exact Gauss-Newton matrix.

EKFAC approximates ``(G + λ)⁻¹ ∇f`` with a Kronecker-factored G per module. :class:`RefinedInfluence`
solves ``(G + D) x = ∇f`` for each query with the exact G (the Gauss-Newton matrix of every attributed
module together, :class:`~sketchattr.curvature.ggn.GGNProducts`, streamed over the training data) by
conjugate gradients preconditioned with EKFAC at the same damping D (ASTRA, 2025, refines EKFAC with
preconditioned Neumann iterations; CG converges faster), starting from EKFAC's answer. Iteration 0
*is* EKFAC; the starting residual and each iteration cost one G product, i.e. about four backward
passes over the training examples used (:attr:`RefinedInfluence.passes_`). The refined queries are
then sketched with the store's projector like EKFAC's, so every store EKFAC reads works (exact rows,
the sparse eigenbasis, random sketches). Not for FSDP2-sharded models (G products need whole
parameters).

Measured (``docs/scorers.md``): 1.19–1.21 × EKFAC's LDS on the digits MLPs, below EKFAC on the
language-model benches at every damping tried — use it for classifiers.

Stopping rule (no ground truth): a query stops when its relative residual ``‖∇f − (G + λ)x‖/‖∇f‖`` is
at most ``tol``, or after ``iterations``. Damping "auto" (this scorer's own rule): one λ for every
module, ``AUTO_TRACE_MULTIPLE`` × the mean EKFAC eigenvalue, i.e. 10 · tr(G)/d (EKFAC's Λ of a module
sum to the trace of its block of G). At EKFAC's own "auto" (max Λ / 3·10⁴) the exact solve is
ill-conditioned (residual ≈ 1 after 8 iterations on the markov LM) and loses badly
(``docs/scorers.md`` has the measured LDS over a damping grid and what was ruled out).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from sketchattr.curvature.factors import Factors
from sketchattr.curvature.ggn import GGNProducts
from sketchattr.featurize.featurizer import Featurizer
from sketchattr.score.ekfac import Curvature, EKFACScorer
from sketchattr.store import GradientStore

if TYPE_CHECKING:
    from sketchattr.distributed.collective import Collective

__all__ = ["AUTO_TRACE_MULTIPLE", "CGHistory", "RefinedInfluence", "preconditioned_cg", "refined_damping"]

#: damping "auto": λ = this × the mean EKFAC eigenvalue (10 · tr(G)/d), one λ for every module
AUTO_TRACE_MULTIPLE = 10.0


def refined_damping(factors: Factors) -> float:
    """RefinedInfluence's damping "auto": ``AUTO_TRACE_MULTIPLE`` × the mean EKFAC eigenvalue over every
    module of ``factors``. Build a sparse-eigenbasis store for it with the same λ:
    ``SparseEigenbasisProjector(m, factors, damping=refined_damping(factors))``."""
    lams = [factors.curvature(name, "ekfac")[2].reshape(-1).double() for name in factors.modules]
    mean = float(torch.cat(lams).mean())
    if not mean > 0:
        raise ValueError("damping 'auto' is a multiple of the mean EKFAC eigenvalue, and every eigenvalue is 0: give damping=λ > 0")
    return AUTO_TRACE_MULTIPLE * mean


@dataclass
class CGHistory:
    """Per iteration: the median relative residual over the queries and how many still iterate."""

    residuals: list[float] = field(default_factory=list)
    active: list[int] = field(default_factory=list)


def preconditioned_cg(apply_a: Callable[[torch.Tensor], torch.Tensor], apply_m: Callable[[torch.Tensor], torch.Tensor],
                      b: torch.Tensor, iterations: int, tol: float) -> tuple[torch.Tensor, CGHistory]:
    """Solve ``A x = b`` row by row ``[Q, d]``, A symmetric positive definite, by conjugate gradients
    preconditioned with ``apply_m`` ≈ A⁻¹, from ``x₀ = M b``. A row stops once its relative residual is
    ≤ ``tol``. Products with A: one for the starting residual, then one per iteration, at most
    ``iterations`` (only the rows still iterating are multiplied); none when ``iterations`` is 0."""
    x = apply_m(b)
    history = CGHistory()
    if iterations == 0:
        return x, history
    norm_b = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
    r = b - apply_a(x)
    z = apply_m(r)
    p, rz = z.clone(), (r * z).sum(1)
    for _ in range(iterations + 1):
        rel = r.norm(dim=1) / norm_b
        active = (rel > tol).nonzero().squeeze(1)
        history.residuals.append(float(rel.median()))
        history.active.append(int(active.numel()))
        if active.numel() == 0 or len(history.residuals) > iterations:
            break
        ap = apply_a(p[active])
        alpha = rz[active] / (p[active] * ap).sum(1)
        x[active] += alpha[:, None] * p[active]
        r[active] -= alpha[:, None] * ap
        z_a = apply_m(r[active])
        rz_new = (r[active] * z_a).sum(1)
        p[active] = z_a + (rz_new / rz[active])[:, None] * p[active]
        rz[active] = rz_new
    return x, history


class RefinedInfluence(EKFACScorer, name="refined"):
    """EKFAC-preconditioned CG on the exact Gauss-Newton matrix (see the module docstring).

    train_dataset: the training examples whose G is used (``ggn_examples``: only the first that many;
    default all). iterations / tol: the stopping rule. damping: "auto" (this scorer's rule, see the module
    docstring), a float λ > 0 or {module: λ}, as :class:`EKFACScorer`.
    ggn_batch_size: examples per G-product batch (default: the featurizer's). Other keywords go to
    :class:`EKFACScorer`. After preparing queries: ``history_`` (:class:`CGHistory` of the last
    solve) and ``passes_`` (G products made so far, each about four backward passes over the data).
    """

    def __init__(self, factors: Factors, featurizer: Featurizer, train_dataset: Any,
                 damping: "float | str | dict[str, float] | None" = "auto", iterations: int = 10, tol: float = 0.05,
                 ggn_examples: int | None = None, ggn_batch_size: int | None = None, **kwargs: Any) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an int >= 0 (0 = EKFAC), got {iterations!r}")
        if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0):
            raise ValueError(f"tol must be a relative residual >= 0, got {tol!r}")
        super().__init__(factors, featurizer, damping=damping, **kwargs)
        if isinstance(damping, str) and damping == "auto":  # this scorer's rule, not EKFAC's
            self._curvature, self.damping_ = self._damped(refined_damping(factors))
        self.ggn = GGNProducts(featurizer.model, featurizer.task, train_dataset, featurizer.selection(),
                               batch_size=ggn_batch_size or featurizer.batch_size, collate_fn=featurizer.collate_fn,
                               max_examples=ggn_examples, progress=featurizer.progress)
        self.iterations, self.tol = iterations, float(tol)
        self.history_: CGHistory | None = None

    def fit(self, store: GradientStore, collective: "Collective | None" = None) -> "RefinedInfluence":
        """Bind the store (as :meth:`EKFACScorer.fit`); warns when a sparse-eigenbasis store ranked its
        coordinates at another damping than this scorer's (it then keeps the wrong ones: on the digits MLP
        at d/8, 0.666 LDS with EKFAC's λ against 0.765 with the refined λ)."""
        super().fit(store, collective)
        spec = self.featurizer.projector.spec()
        if spec.get("type") == "eigen_topk":
            lam = set(self.damping_.values())
            if not (isinstance(spec.get("damping"), (int, float)) and len(lam) == 1
                    and math.isclose(float(spec["damping"]), lam.pop(), rel_tol=1e-6)):
                warnings.warn(f"RefinedInfluence reads a sparse-eigenbasis store whose coordinates were ranked at damping "
                              f"{spec.get('damping')!r}, not this scorer's λ ({self._damping_text()}): build the store with "
                              "SparseEigenbasisProjector(m, factors, damping=sa.refined_damping(factors)) (or this scorer's "
                              "λ) to keep the coordinates the refined queries weigh most", stacklevel=2)
        return self

    def _damping_text(self) -> str:
        values = sorted(set(self.damping_.values()))
        return f"{values[0]:.4g}" if len(values) == 1 else "per module"

    @property
    def passes_(self) -> int:
        """G products made so far (each about four backward passes over the training examples used)."""
        return self.ggn.passes

    def score_grid(self, queries: Any, dampings: Sequence[Any], kind: str = "query") -> torch.Tensor:
        raise NotImplementedError("RefinedInfluence solves one system per damping: build one scorer per damping")

    # ------------------------------------------------------------------ the solve
    def _flat(self, dws: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-block matrices -> one flat row block ``[B, d]`` in the factors' dtype."""
        return torch.cat(self._flat_blocks([dw.to(self.dtype) for dw in dws]), dim=1)

    def _operators(self, lambdas: dict[str, float], curvature: list[Curvature]
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """(v -> (G + λ)v, v -> EKFAC's (G + λ)⁻¹v) on flat ``[Q, d]`` vectors."""
        diag = torch.cat([torch.full((b.dim,), lambdas[b.name], dtype=self.dtype, device=self.device) for b in self.blocks])
        apply_a = lambda v: self.ggn(v).to(self.dtype) + diag * v
        apply_m = lambda v: self._flat(self.precondition(self._block_matrices(v), curvature))
        return apply_a, apply_m

    def _query_side(self, dws: Sequence[torch.Tensor], curvature: list[Curvature]) -> list[torch.Tensor]:
        """Per-block query gradients [B, *shape] -> the refined (G + λ)⁻¹ ∇f per block (this scorer's damping)."""
        with self.profiler.record("refine (G products)"):
            apply_a, apply_m = self._operators(self.damping_, self._curvature)
            x, self.history_ = preconditioned_cg(apply_a, apply_m, self._flat(dws), self.iterations, self.tol)
        return self._block_matrices(x)

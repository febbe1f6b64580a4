"""Why the exact Gauss-Newton matrix helps some models and not others: EKFAC and RefinedInfluence
(EKFAC-preconditioned CG on the exact G) side by side over a damping grid.

For each bench of ``lds_methods.py`` and each λ = x · mean(Λ) (``--unit sigma``: x · σ_max; Λ: all
EKFAC eigenvalues, σ_max the largest; one λ on every module; x = ``auto``: EKFAC's own per-module
damping, max Λ / 3·10⁴), the LDS of EKFAC at that λ, of the refined solve (≤ ``--iterations`` CG iterations,
stopping at relative residual ``--tol``) with the full G, optionally with only G's per-module diagonal
blocks (``--block``: per-layer exact curvature, no coupling between layers; one G product per module
per iteration), the median ‖x_refined‖ / ‖x_EKFAC‖ over the queries, the residual history and the G
products made. ``--controls`` adds, per λ, the exact per-sequence empirical Fisher F = RᵀR/N of the
store rows R (rank ≤ N, solved exactly by Woodbury; full and per-module blocks), and once per bench
EKFAC fitted with the empirical instead of the true Fisher.

    python benchmarks/refined_damping.py --benches digits-sgd digits-adam        # ~1 min (ground truth cached)
    python benchmarks/refined_damping.py --benches markov --multiples 10 --block --queries 20 --iterations 6
    python benchmarks/refined_damping.py --benches markov --unit sigma --multiples 3 1 0.3 0.1 0.03 0.01 0.001 auto \
        --queries 25 --iterations 8 --tol 0 --controls                          # the markov table of docs/scorers.md
    python benchmarks/refined_damping.py --quick                                 # digits-sgd, 20 subsets, 2 λ
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

import sketchattr as sa
from lds_methods import DigitsBench, LMBench
from sketchattr.score.refined import RefinedInfluence
from sketchattr.validate.lds import lds


class BlockDiagonalRefined(RefinedInfluence):
    """RefinedInfluence with only the per-module diagonal blocks of G (module k's v through G, read back
    on module k): one G product per module and iteration."""

    def _operators(self, lambdas, curvature):
        _, apply_m = super()._operators(lambdas, curvature)
        dims = [b.dim for b in self.blocks]
        diag = torch.cat([torch.full((b.dim,), lambdas[b.name], dtype=self.dtype, device=self.device) for b in self.blocks])

        def apply_a(v: torch.Tensor) -> torch.Tensor:
            parts = v.split(dims, dim=1)
            masked = [torch.cat([p if j == k else torch.zeros_like(p) for j, p in enumerate(parts)], 1) for k in range(len(dims))]
            out = self.ggn(torch.cat(masked)).to(self.dtype).split(v.shape[0])
            return torch.cat([o.split(dims, dim=1)[k] for k, o in enumerate(out)], 1) + diag * v
        return apply_a, apply_m


def woodbury_solve(rows: torch.Tensor, lam: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(RᵀR/N + diag λ)⁻¹ qᵀ for rows R [N, d], λ [d], q [Q, d] -> [Q, d], exactly (an N × N solve)."""
    n = rows.shape[0]
    lq, lr = q / lam, rows / lam
    inner = n * torch.eye(n, dtype=rows.dtype) + rows @ lr.T
    return lq - torch.linalg.solve(inner, rows @ lq.T).T @ lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits-sgd, ground truth 20 subsets x 1 seed, x = 10 and 1")
    parser.add_argument("--benches", nargs="+", default=["digits-sgd", "digits-adam", "markov"],
                        help="markov markov-wide prose digits-sgd digits-adam")
    parser.add_argument("--multiples", nargs="+", default=["100", "10", "1"], help="λ = x · mean(Λ) (or σ_max), or auto")
    parser.add_argument("--unit", choices=("mean", "sigma"), default="mean", help="λ in multiples of mean(Λ) or of σ_max")
    parser.add_argument("--controls", action="store_true", help="exact empirical Fisher (Woodbury) and empirical-Fisher EKFAC")
    parser.add_argument("--block", action="store_true", help="also the per-module diagonal blocks of G")
    parser.add_argument("--queries", type=int, default=None, help="only the first N queries")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--tol", type=float, default=0.02)
    parser.add_argument("--cache_dir", default="grad_cache")
    args = parser.parse_args()
    torch.set_num_threads(2)
    benches, multiples = (["digits-sgd"], ["10", "1"]) if args.quick else (args.benches, args.multiples)
    print("| bench | x | λ / σ_max | G | EKFAC at λ | refined | ‖x‖/‖x_EKFAC‖ | median rel. residual | G products | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in tqdm(benches, desc="benches"):
        bench = (DigitsBench(name.split("-")[1], args.quick, args.cache_dir) if name.startswith("digits")
                 else LMBench(name, args.quick, args.cache_dir))
        n_q = len(bench.queries) if args.queries is None else min(args.queries, len(bench.queries))
        queries, outputs = Subset(bench.queries, range(n_q)), bench.gt.outputs[:, :n_q]
        L = lambda s: lds(s.double().cpu().numpy(), bench.gt.masks, outputs).mean
        feat = bench.featurizer()
        store, factors = feat.featurize(bench.train), bench.factors()
        auto = sa.EKFACScorer(factors, feat).fit(store)
        lams = torch.cat([lam.reshape(-1) for _, _, lam in auto.bases]).double()
        mean, sigma = float(lams.mean()), float(lams.max())
        print(f"| {name} | EKFAC auto | | | {L(auto.score(queries)):.3f} | | | | 0 | |", flush=True)
        if args.controls:
            empirical = sa.fit_factors(bench.model, bench.task, bench.train, kind="ekfac", modules=feat.selection().names,
                                       fisher="empirical", batch_size=feat.batch_size, collate_fn=feat.collate_fn, progress=False)
            print(f"| {name} | EKFAC auto, empirical Fisher | | | {L(sa.EKFACScorer(empirical, feat).fit(store).score(queries)):.3f} "
                  "| | | | 0 | |", flush=True)
            rows = store.rows().double()
            grads = torch.cat([torch.cat([b.layout.to_flat(m) for b, m in zip(auto.blocks, dws)], 1)
                               for _, dws in auto.module_gradients(queries)]).double()
            dims = [b.dim for b in auto.blocks]
        kinds = [("full", RefinedInfluence)] + ([("per-module blocks", BlockDiagonalRefined)] if args.block else [])
        for x in multiples:
            # "auto": EKFAC's own per-module λ for both (RefinedInfluence's "auto" is its own rule, 10 · mean Λ)
            damping = dict(auto.damping_) if x == "auto" else float(x) * (sigma if args.unit == "sigma" else mean)
            ekfac = sa.EKFACScorer(factors, feat, damping=damping).fit(store)
            plain = ekfac.prepare_queries(queries)
            scale = "" if x == "auto" else f"{damping / sigma:.1e}"
            for label, kind in kinds:
                t0 = time.perf_counter()
                refined = kind(factors, feat, bench.train, damping=damping, iterations=args.iterations, tol=args.tol).fit(store)
                prepared = refined.prepare_queries(queries)
                value, seconds = L(refined.score(prepared)), time.perf_counter() - t0
                ratio = float((prepared.rows.norm(dim=1) / plain.rows.norm(dim=1)).median())
                res = refined.history_.residuals
                print(f"| {name} | {x} | {scale} | {label} | {L(ekfac.score(plain)):.3f} | {value:.3f} | "
                      f"{ratio:.2f} | {res[0]:.3g} → {res[-1]:.3g} | {refined.passes_} | {seconds:.0f} |", flush=True)
            if args.controls:
                lam = torch.cat([torch.full((b.dim,), ekfac.damping_[b.name], dtype=torch.float64) for b in auto.blocks])
                full = woodbury_solve(rows, lam, grads)
                blocks = torch.cat([woodbury_solve(r, lm, q) for r, lm, q in
                                    zip(rows.split(dims, 1), lam.split(dims), grads.split(dims, 1))], 1)
                for label, x_q in (("empirical Fisher, exact", full), ("empirical Fisher, per-module blocks", blocks)):
                    print(f"| {name} | {x} | {scale} | {label} | | {L(-(x_q @ rows.T)):.3f} | | | 0 | |", flush=True)


if __name__ == "__main__":
    main()

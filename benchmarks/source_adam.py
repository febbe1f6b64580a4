"""Does modelling Adam per coordinate help SOURCE? LDS of EKFAC, SOURCE with a scalar step and SOURCE
with Adam's per-coordinate steps, on the Adam-trained benches of ``lds_methods.py``.

Adam's update θ ← θ − lr · P m̂ with P = diag(1/(√v̂ + ε)) is gradient descent in θ' = P^{-1/2} θ on
H' = P^{1/2} H P^{1/2} (Bae et al. 2024, App. D treat Adam the same way: a fixed preconditioner per
segment). With D_ℓ = P_ℓ^{1/2} at segment ℓ's checkpoint and c_ℓ = Σ lr (per unit of the per-example
loss), the segment carries a perturbation by S_ℓ = D_ℓ exp(−c_ℓ H'_ℓ) D_ℓ⁻¹ and adds
−D_ℓ (I − exp(−c_ℓ H'_ℓ)) H'_ℓ⁻¹ D_ℓ ḡ_ℓ. H'_ℓ is taken as EKFAC in the checkpoint's Kronecker basis with
its eigenvalues refitted on D-scaled per-example gradients (``--fisher empirical``: the store rows;
``true``: labels drawn from the model, one draw per example, classifiers only), since D breaks the
Kronecker structure. Both SOURCE rows use the same eigenvalue estimate, so they differ only in D. Rows:

* ``EKFAC``: the last checkpoint, damping "auto";
* ``SOURCE, scalar step``: D = √median(P) on every coordinate (the median step stands in for
  Adam's; eigenvalues refitted the same way — this is what ``SourceInfluence`` computes, up to the
  Fisher's estimate);
* ``SOURCE, Adam per coordinate``: D = P^{1/2}.

    python benchmarks/source_adam.py                          # markov, markov-wide, prose, digits-adam (~6 min)
    python benchmarks/source_adam.py --benches digits-adam --fisher true
    python benchmarks/source_adam.py --quick                  # markov, ground truth 20 subsets × 1 seed
"""
from __future__ import annotations

import argparse
import copy

import torch
from tqdm.auto import tqdm

import sketchattr as sa
from lds_methods import DigitsBench, LMBench
from sketchattr.curvature.passes import rotate
from sketchattr.score.source import segment_backward, segment_weight, spectral_map
from sketchattr.validate.lds import lds

ADAM_EPS = 1e-8


def sampled_labels(task: sa.Task) -> sa.Task:
    """The same task whose training loss always draws its targets from the model (true-Fisher rows)."""
    class Sampled(type(task)):
        def train_loss(self, model, batch, sample=False):
            return super().train_loss(model, batch, sample=True)

    out = copy.copy(task)
    out.__class__ = Sampled
    return out


def source_scores(bench, per_coordinate: bool, fisher: str) -> torch.Tensor:
    """SOURCE scores [n_query, n_train] with D per coordinate (Adam) or one scalar D (module docstring)."""
    segments = []
    for model, (vhat, c) in zip(bench.checkpoints, bench.adam):
        feat = bench.featurizer(model)
        ekfac = sa.EKFACScorer(bench.factors(model), feat)
        p = torch.cat([1.0 / (vhat[n].double().sqrt().reshape(-1) + ADAM_EPS) for n in feat.selection().parameters(model)])
        d = p.sqrt() if per_coordinate else torch.full_like(p, float(p.median()) ** 0.5)
        rows = feat.featurize(bench.train).rows().double()
        if fisher == "true":  # one label draw per example from the model; a task drawing fresh labels per call
            # leaves the hook engine for torch.func.vmap, which runs the MLP but not the Hugging Face GPT-2
            drawn = sa.Featurizer(model, sampled_labels(bench.task), modules=feat.selection().names, projector="identity",
                                  batch_size=feat.batch_size, collate_fn=feat.collate_fn, progress=False)
            torch.manual_seed(0)
            fisher_rows = drawn.featurize(bench.train).rows().double()
        else:
            fisher_rows = rows
        segments.append((ekfac, rows, fisher_rows, d, float(c)))
    blocks = segments[-1][0].blocks
    dims = [b.dim for b in blocks]
    split = lambda v: [b.layout.from_flat(x) for b, x in zip(blocks, v.split(dims, 1))]
    join = lambda ms: torch.cat([b.layout.to_flat(m) for b, m in zip(blocks, ms)], 1)
    u = torch.cat([join(dws) for _, dws in segments[-1][0].module_gradients(bench.queries)]).double()
    scores = 0
    for ekfac, rows, sampled, d, c in reversed(segments):
        bases = ekfac.bases
        lams = [(rotate(b.layout.from_flat(x), qs, qa) ** 2).mean(0) for b, (qs, qa, _), x in zip(blocks, bases, (sampled * d).split(dims, 1))]
        scaled = split(u * d)
        weighted = join([spectral_map(m, qs, qa, segment_weight(lam, c)) for m, (qs, qa, _), lam in zip(scaled, bases, lams)]) * d
        scores = scores - weighted @ rows.T
        u = join([spectral_map(m, qs, qa, segment_backward(lam, c)) for m, (qs, qa, _), lam in zip(scaled, bases, lams)]) / d
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the markov bench, ground truth 20 subsets × 1 seed")
    parser.add_argument("--benches", nargs="+", default=["markov", "markov-wide", "prose", "digits-adam"])
    parser.add_argument("--fisher", choices=("empirical", "true"), default="empirical",
                        help="rows the eigenvalues are refitted on (true: classifiers only)")
    parser.add_argument("--cache_dir", default="grad_cache")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"| bench | EKFAC | SOURCE, scalar step ({args.fisher} Fisher) | SOURCE, Adam per coordinate |\n|---|---|---|---|")
    for name in tqdm(["markov"] if args.quick else args.benches, desc="benches"):
        if name == "digits-sgd":
            raise SystemExit("digits-sgd is trained with SGD: nothing per coordinate to model")
        if args.fisher == "true" and not name.startswith("digits"):
            raise SystemExit("--fisher true featurizes with labels drawn per call, which falls back to torch.func.vmap, "
                             "and vmap cannot run the Hugging Face GPT-2: use --fisher empirical on the language models")
        bench = DigitsBench("adam", args.quick, args.cache_dir) if name == "digits-adam" else LMBench(name, args.quick, args.cache_dir)
        L = lambda s: lds(s.double().cpu().numpy(), bench.gt.masks, bench.gt.outputs).mean
        feat = bench.featurizer()
        ekfac = L(sa.EKFACScorer(bench.factors(), feat).fit(feat.featurize(bench.train)).score(bench.queries))
        scalar, adam = L(source_scores(bench, False, args.fisher)), L(source_scores(bench, True, args.fisher))
        print(f"| {name} | {ekfac:.3f} | {scalar:.3f} ({scalar / ekfac:.2f}×) | {adam:.3f} ({adam / ekfac:.2f}×) |", flush=True)


if __name__ == "__main__":
    main()

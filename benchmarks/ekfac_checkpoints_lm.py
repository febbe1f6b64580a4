"""EKFAC averaged over models on the language-model benches: which members, and at which store width.

For each LM bench of ``lds_methods.py`` (the 2-layer GPT-2, AdamW, 8 epochs), LDS of EKFAC on the
final model and of ``EnsembleInfluence`` of EKFAC members (each member's scores divided by their RMS
per query, then averaged):

* K independently trained seeds (the final models; TRAK's kind of ensemble, K − 1 extra trainings);
* checkpoints of the one run: every epoch, every second epoch (what ``lds_methods.py`` uses), the last
  four epochs;
* every second epoch with sparse-eigenbasis stores of d/32 columns each (d/8 in all).

    python benchmarks/ekfac_checkpoints_lm.py                    # markov, markov-wide, prose (~6 min, ground truth cached)
    python benchmarks/ekfac_checkpoints_lm.py --quick            # markov, ground truth 20 subsets × 1 seed
"""
from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

import sketchattr as sa
from lds_methods import LMBench
from sketchattr.bench.recipes import train_markov_lm
from sketchattr.validate.lds import lds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="markov, ground truth 20 subsets × 1 seed, 3 seeds")
    parser.add_argument("--benches", nargs="+", default=["markov", "markov-wide", "prose"])
    parser.add_argument("--seeds", type=int, default=5, help="independently trained members")
    parser.add_argument("--cache_dir", default="grad_cache")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = 3 if args.quick else args.seeds
    print("| bench | members | store columns | LDS | × EKFAC |\n|---|---|---|---|---|")
    for name in tqdm(["markov"] if args.quick else args.benches, desc="benches"):
        bench = LMBench(name, args.quick, args.cache_dir)
        L = lambda s: lds(s.double().cpu().numpy(), bench.gt.masks, bench.gt.outputs).mean

        def member(model, projector="identity"):
            factors = bench.factors(model)
            proj = sa.SparseEigenbasisProjector(projector, factors) if isinstance(projector, int) else projector
            f = bench.featurizer(model, projector=proj)
            return sa.EKFACScorer(factors, f), f.featurize(bench.train)

        def ensemble(members) -> float:
            return L(sa.EnsembleInfluence([m for m, _ in members], normalize="rms").fit([s for _, s in members])
                     .score(bench.queries))

        epochs, _ = bench._train(epochs=8, every=1)  # the same run, a copy after every epoch
        per_epoch = [member(m) for m in tqdm(epochs, desc="members", leave=False)]
        d = per_epoch[-1][1].dim
        single = L(per_epoch[-1][0].fit(per_epoch[-1][1]).score(bench.queries))
        rows = [("EKFAC, final model", "d", single)]
        others = [member(train_markov_lm(seed=s, text=bench.text)) for s in range(1, seeds)]
        rows.append((f"{seeds} independently trained seeds", f"{seeds} × d", ensemble([per_epoch[-1]] + others)))
        rows.append(("checkpoints after every epoch (8)", "8 × d", ensemble(per_epoch)))
        rows.append(("every second epoch (4)", "4 × d", ensemble(per_epoch[1::2])))
        rows.append(("the last 4 epochs", "4 × d", ensemble(per_epoch[4:])))
        m = 2 * (d // 64)
        rows.append((f"every second epoch, sparse eigenbasis d/32 each", f"{4 * m:,} (d/{d / (4 * m):.0f})",
                     ensemble([member(model, m) for model in epochs[1::2]])))
        for label, columns, value in rows:
            print(f"| {name} | {label} | {columns} | {value:.3f} | {value / single:.2f} |", flush=True)


if __name__ == "__main__":
    main()

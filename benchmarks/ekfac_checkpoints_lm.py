"""EKFAC averaged over models on the language-model benches: which members, and at which store width.

For each LM bench of ``lds_methods.py`` (the 2-layer GPT-2, AdamW, 8 epochs), LDS of EKFAC on the
final model and of ``EnsembleInfluence`` of EKFAC members (each member's scores divided by their RMS
per query, then averaged):

* K independently trained seeds (the final models; TRAK's kind of ensemble, K − 1 extra trainings);
* checkpoints of the one run: every epoch, every second epoch (what ``lds_methods.py`` uses), the last
  four epochs;
* each epoch's checkpoint alone (printed as one line);
* seeds × checkpoints: every second epoch of 2 runs, and of all ``--seeds`` runs; every seed's
  checkpoint after epoch 4 (as many optimizer steps as the ground truth's half-data retrainings);
* every second epoch with sparse-eigenbasis stores of d/32 columns each (d/8 in all).

Seconds: fitting each member's factors and featurizing its store, then the ensemble's fit and score
(the extra seeds' training is not counted).

    python benchmarks/ekfac_checkpoints_lm.py                    # markov, markov-wide, prose (~13 min, ground truth cached)
    python benchmarks/ekfac_checkpoints_lm.py --quick            # markov, ground truth 20 subsets × 1 seed
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

import sketchattr as sa
from lds_methods import LMBench
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
    print("| bench | members | store columns | LDS | × EKFAC | seconds | × EKFAC's seconds |\n|---|---|---|---|---|---|---|")
    for name in tqdm(["markov"] if args.quick else args.benches, desc="benches"):
        bench = LMBench(name, args.quick, args.cache_dir)
        L = lambda s: lds(s.double().cpu().numpy(), bench.gt.masks, bench.gt.outputs).mean

        def member(model, projector="identity") -> tuple:
            """(EKFAC scorer, train store, seconds to fit the factors and featurize)."""
            t0 = time.perf_counter()
            factors = bench.factors(model)
            proj = sa.SparseEigenbasisProjector(projector, factors) if isinstance(projector, int) else projector
            f = bench.featurizer(model, projector=proj)
            store = f.featurize(bench.train)
            return sa.EKFACScorer(factors, f), store, time.perf_counter() - t0

        def ensemble(members) -> tuple[float, float]:
            """(LDS, seconds: the members' factors and stores, then the ensemble's fit and score)."""
            t0 = time.perf_counter()
            scores = sa.EnsembleInfluence([m for m, _, _ in members], normalize="rms").fit([s for _, s, _ in members])
            value = L(scores.score(bench.queries))
            return value, sum(t for _, _, t in members) + time.perf_counter() - t0

        runs = [bench._train(epochs=8, every=1, seed=s)[0] for s in tqdm(range(seeds), desc="training seeds", leave=False)]
        epochs = runs[0]  # seed 0 (the bench's model), a copy after every epoch
        per_epoch = [member(m) for m in tqdm(epochs, desc="members", leave=False)]
        per_run = [per_epoch[1::2]] + [[member(m) for m in tqdm(run[1::2], desc="members", leave=False)] for run in runs[1:]]
        d = per_epoch[-1][1].dim
        t0 = time.perf_counter()
        single = L(per_epoch[-1][0].fit(per_epoch[-1][1]).score(bench.queries))
        single_seconds = per_epoch[-1][2] + time.perf_counter() - t0
        rows = [("EKFAC, final model", "d", (single, single_seconds))]
        alone = [L(scorer.fit(store).score(bench.queries)) for scorer, store, _ in per_epoch]
        print(f"  {name}: EKFAC on the checkpoint after epoch 1..8 alone: " + " ".join(f"{v:.3f}" for v in alone), flush=True)
        rows.append((f"{seeds} independently trained seeds", f"{seeds} × d", ensemble([run[-1] for run in per_run])))
        rows.append(("checkpoints after every epoch (8)", "8 × d", ensemble(per_epoch)))
        rows.append(("every second epoch (4)", "4 × d", ensemble(per_epoch[1::2])))
        rows.append(("the last 4 epochs", "4 × d", ensemble(per_epoch[4:])))
        rows.append(("2 seeds × every second epoch (8)", "8 × d", ensemble(per_run[0] + per_run[1])))
        rows.append((f"{seeds} seeds × every second epoch ({4 * seeds})", f"{4 * seeds} × d",
                     ensemble([m for run in per_run for m in run])))
        rows.append((f"{seeds} seeds, each after epoch 4 (half the run's steps)", f"{seeds} × d",
                     ensemble([per_epoch[3]] + [member(run[3]) for run in runs[1:]])))
        m = 2 * (d // 64)
        rows.append((f"every second epoch, sparse eigenbasis d/32 each", f"{4 * m:,} (d/{d / (4 * m):.0f})",
                     ensemble([member(model, m) for model in epochs[1::2]])))
        for label, columns, (value, seconds) in rows:
            print(f"| {name} | {label} | {columns} | {value:.3f} | {value / single:.2f} | {seconds:.1f} "
                  f"| {seconds / single_seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()

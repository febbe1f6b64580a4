"""Ensembled regularized influence against TRAK at equal members, on digits-mlp and the MNIST MLP.

Same members (the independently trained seeds 0..9 of ``experiments/ensemble_members.py``, cached
in ``grad_cache/ensemble_models``; and the seed-0 checkpoints), the same projection size (ours:
SJLT m per member; TRAK: its ``proj_dim``; TRAK is also run at m/2 and m/4, since its unregularized
(XᵀX)⁻¹ degrades as proj_dim approaches the number of train rows), the same margin measurement and the same cached
retraining ground truth. Member counts k < 10 are scored on disjoint groups of the seeds and the
median LDS is quoted, for both. TRAK (traker 0.3.2) runs in its own venv as a subprocess of this
script (``--worker``: no sketchattr import there), on the CPU with its BasicProjector (Gaussian;
the ``fast_jl`` CUDA kernel is not used), float32, ``lambda_reg=0`` (its default); files are
exchanged as .pt / .npy:

    python -m venv /tmp/trakvenv && /tmp/trakvenv/bin/pip install torch==2.13.0 \\
        && /tmp/trakvenv/bin/pip install --no-deps traker==0.3.2 \\
        && /tmp/trakvenv/bin/pip install numpy scipy tqdm scikit-learn h5py
    python benchmarks/ensemble_trak.py                      # both benches (MNIST's TRAK side: minutes)
    python benchmarks/ensemble_trak.py --quick              # digits, 1 and 3 members
    python benchmarks/ensemble_trak.py --trak_python /path/to/venv/bin/python

Our figures come from ``experiments/results/ensemble_members.json`` (written by
``experiments/ensemble_members.py``; computed here if missing). Writes
``experiments/results/ensemble_trak.json``, which ``ensemble_members.py --plot`` draws beside ours.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ TRAK side (runs in the TRAK venv)
def mlp_from_state_dict(state: dict) -> torch.nn.Sequential:
    """The bench MLP (Linear -> ReLU -> ... -> Linear, modules "0", "2", ...) rebuilt from its weights,
    so the payload carries tensors only (the TRAK venv has no sketchattr to build it from)."""
    names = sorted({k.split(".")[0] for k in state}, key=int)
    layers: list = []
    for i, name in enumerate(names):
        out_dim, in_dim = state[f"{name}.weight"].shape
        layers += [torch.nn.Linear(in_dim, out_dim)] + ([torch.nn.ReLU()] if i < len(names) - 1 else [])
    model = torch.nn.Sequential(*layers)
    model.load_state_dict(state)
    return model.eval()


def worker(payload: str, out: str) -> None:
    """Featurize every member with TRAK, score the queries, write scores per requested group."""
    import logging

    from trak import TRAKer

    data = torch.load(payload, weights_only=True)  # tensors, numbers and names only: no pickled code
    models, groups, bs = [mlp_from_state_dict(sd) for sd in data["state_dicts"]], data["groups"], data["batch_size"]
    x, y, xq, yq = data["x_train"], data["y_train"], data["x_query"], data["y_query"]
    torch.set_num_threads(data["threads"])
    times = {}
    for proj_dim in data["proj_dims"]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            traker = TRAKer(model=models[0], task="image_classification", train_set_size=len(x), save_dir=tmp, device="cpu",
                            proj_dim=proj_dim, use_half_precision=False, logging_level=logging.ERROR)
            for mid, model in enumerate(models):
                traker.load_checkpoint(model.state_dict(), model_id=mid)
                for s in range(0, len(x), bs):
                    traker.featurize(batch=(x[s : s + bs], y[s : s + bs]), num_samples=len(x[s : s + bs]))
            traker.finalize_features()
            t1 = time.perf_counter()
            for mid, model in enumerate(models):
                traker.start_scoring_checkpoint(exp_name="queries", checkpoint=model.state_dict(), model_id=mid,
                                                num_targets=len(xq))
                traker.score(batch=(xq, yq), num_samples=len(xq))
            for name, ids in groups.items():  # TRAK's own ensembling over the given model ids
                scores = np.asarray(traker.finalize_scores(exp_name="queries", model_ids=ids)).T  # [n_query, n_train]
                np.save(Path(out) / f"p{proj_dim}_{name}.npy", scores)
            times[proj_dim] = {"featurize_s_per_model": (t1 - t0) / len(models),
                               "score_s_per_model": (time.perf_counter() - t1) / len(models)}
    (Path(out) / "times.json").write_text(json.dumps(times))


# ------------------------------------------------------------------ our side
def run_trak(bench_name: str, models: list, split, groups: dict[str, list[int]], proj_dims: list[int], trak_python: str,
             batch_size: int, threads: int) -> tuple[dict[str, np.ndarray], dict]:
    """TRAK scores [n_query, n_train] per "p{proj_dim}_{group}" and its seconds per model, from the side venv."""
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "payload.pt"
        torch.save({"state_dicts": [m.state_dict() for m in models], "groups": groups, "batch_size": batch_size, "proj_dims": proj_dims, "threads": threads,
                    "x_train": split.x_train.float(), "y_train": split.y_train, "x_query": split.x_query.float(),
                    "y_query": split.y_query}, payload)
        t = time.perf_counter()
        proc = subprocess.run([trak_python, __file__, "--worker", str(payload), tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"TRAK worker failed on {bench_name}:\n{proc.stderr[-3000:]}")
        scores = {f"p{p}_{name}": np.load(Path(tmp) / f"p{p}_{name}.npy") for p in proj_dims for name in groups}
        times = json.loads((Path(tmp) / "times.json").read_text())
        times["wall_s"] = time.perf_counter() - t
    return scores, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("PAYLOAD", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--benches", default="digits-mlp,mnist-mlp")
    ap.add_argument("--trak_python", default="/tmp/trakvenv/bin/python")
    ap.add_argument("--cache_dir", default=str(ROOT / "grad_cache"))
    ap.add_argument("--ours", default=str(ROOT / "experiments/results/ensemble_members.json"))
    ap.add_argument("--output", default=str(ROOT / "experiments/results/ensemble_trak.json"))
    ap.add_argument("--batch_size", type=int, default=500, help="TRAK featurize batch (its CPU projector regenerates "
                    "the Gaussian matrix per batch, so larger is faster)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="digits only, 1 and 3 members")
    ap.add_argument("--rerun_trak", action="store_true", help="rerun TRAK even where --output already holds its figures")
    ap.add_argument("--trak_only", action="store_true", help="run and save TRAK's side only (print ours later)")
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    sys.path.insert(0, str(ROOT / "experiments"))
    import ensemble_members as E
    from sketchattr.validate.lds import lds

    ours = {r["bench"]: r for r in json.loads(Path(args.ours).read_text())} if Path(args.ours).exists() and not args.quick else {}
    names = ["digits-mlp"] if args.quick else args.benches.split(",")
    cached = json.loads(Path(args.output).read_text()) if Path(args.output).exists() and not args.quick else {}
    results = {}
    for name in names:
        bench = E.BENCHES[name]
        counts = (1, 3) if args.quick else bench.counts
        n_seeds = 3 if args.quick else max(bench.counts)
        split = bench.load()
        gt = bench.truth(args.cache_dir)
        groups = {f"k{k}_g{g}": list(range(g * k, (g + 1) * k)) for k in counts for g in range(n_seeds // k)}
        dims = [bench.m] + [p for p in (bench.m // 2, bench.m // 4) if not args.quick]
        if name in cached and not args.rerun_trak:  # TRAK's figures from an earlier run of this script
            lds_at = {p: {k: v for k, v in zip(counts, (cached[name]["lds_groups_by_proj_dim"][str(p)][str(k)] for k in counts))}
                      for p in dims}
            times = {p: cached[name]["times"][str(p)] for p in dims}
        else:
            models = E.member_models(bench, split, list(range(n_seeds)), args.cache_dir)
            scores, raw = run_trak(name, models, split, groups, dims, args.trak_python, args.batch_size, args.threads)
            times = {p: raw[str(p)] for p in dims}  # the worker's JSON keys are strings
            lds_at = {p: {k: [float(lds(scores[f"p{p}_k{k}_g{g}"], gt).mean) for g in range(n_seeds // k)] for k in counts}
                      for p in dims}
        per_k = lds_at[bench.m]
        res = {"proj_dim": bench.m, "lds": {str(k): statistics.median(v) for k, v in per_k.items()},
               "lds_groups": {str(k): v for k, v in per_k.items()}, "times": {str(p): t for p, t in times.items()},
               "lds_by_proj_dim": {str(p): {str(k): statistics.median(v) for k, v in d.items()} for p, d in lds_at.items()},
               "lds_groups_by_proj_dim": {str(p): {str(k): v for k, v in d.items()} for p, d in lds_at.items()}}
        results[name] = res
        if args.trak_only:
            print(f"{name}: TRAK LDS (median over groups) by proj_dim: {res['lds_by_proj_dim']}")
            continue
        if name not in ours:  # our side computed here (ensemble_members.py's run_bench)
            if args.quick:
                b = bench
                bench = E.Bench(b.name, b.load, b.train, b.truth, b.m, counts, {"1": b.ckpt_sets["1"]})
            ours[name] = E.run_bench(bench, args)
        mine = ours[name]
        print(f"\n{name}: same members, projection {bench.m} per member; LDS, median over disjoint groups of seeds")
        extra = "".join(f" {'TRAK-' + str(p):>9}" for p in dims[1:])
        print(f"{'members':>7} {'ours (raw mean)':>15} {'ours (rms)':>10} {'TRAK-' + str(bench.m):>9} {'ours - TRAK':>11}{extra} "
              f"{'groups':>6}")
        for k in counts:
            a, b = mine["independent"][f"{k}:none"]["median"], mine["independent"][f"{k}:rms"]["median"]
            t = res["lds"][str(k)]
            others = "".join(f" {statistics.median(lds_at[p][k]):>9.3f}" for p in dims[1:])
            print(f"{k:>7} {a:>15.3f} {b:>10.3f} {t:>9.3f} {min(a, b) - t:>+11.3f}{others} {len(per_k[k]):>6}")
        c, tt = mine["cost_per_member"], times[bench.m]
        print(f"seconds per member: ours featurize {c['featurize_s']:.1f} + fit {c['fit_s']:.1f} + score {c['score_s']:.2f}; "
              f"TRAK-{bench.m} featurize+finalize {tt['featurize_s_per_model']:.1f} + score {tt['score_s_per_model']:.1f}")
    if not args.quick:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(Path(args.output).read_text()) if Path(args.output).exists() else {}
        Path(args.output).write_text(json.dumps({**old, **results}, indent=1))


if __name__ == "__main__":
    main()

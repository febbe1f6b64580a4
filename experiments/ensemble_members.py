"""LDS of ensembled regularized influence against the number of members (sketchattr.score.ensemble).

Members are independently trained models (seeds 0, 1, ...; seed 0 is the bench model) or
checkpoints of ONE training run (seed 0, ``recipes.train_checkpoints``: no extra training). Every
member gets its own SJLT sketch (seed + c), its own store (one HDF5 group per member, written by
``featurize_members``), its own F̂ and ``damping="auto"`` λ; ``EnsembleInfluence`` averages the
members' scores. Ground truth: the benches' cached retraining LDS (``grad_cache``).

Member counts k < 10 are scored on disjoint groups of the 10 trained seeds (k = 1: ten singles,
k = 2: five pairs, k = 5: two halves) and the median is quoted beside seed 0's figure. A control
separates the two sources of gain: the seed-0 model alone with k independent sketches (sketch
noise averaged, no model averaging). Both ways of
averaging are shown: raw scores (``normalize="none"``) and per-member RMS-normalized scores
(``normalize="rms"``). Trained models are cached under ``<cache_dir>/ensemble_models``.

    python experiments/ensemble_members.py                                   # digits-mlp + mnist-mlp
    python experiments/ensemble_members.py --plot docs/ensemble_members.png  # + the figure
    python experiments/ensemble_members.py --quick                           # digits, 1-3 members, m=512
    python experiments/ensemble_members.py --replot --plot docs/ensemble_members.png  # from the saved JSON
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import sketchattr as sa
from sketchattr.bench import recipes
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.score.ensemble import EnsembleInfluence, featurize_members
from sketchattr.bench import ground_truth
from sketchattr.validate.lds import lds

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Bench:
    name: str
    load: Callable[[], Any]
    train: Callable[..., torch.nn.Module]
    truth: Callable[[str], Any]
    m: int
    counts: tuple[int, ...]              # member counts of independent seeds
    ckpt_sets: dict[str, tuple[int, ...]]  # name -> epochs of one run (seed 0)


BENCHES = {
    "digits-mlp": Bench("digits-mlp", load_digits_split, recipes.train_digits_mlp,
                        lambda d: ground_truth.digits_ground_truth(d, progress=False), 1024, (1, 2, 5, 10),
                        {"1": (60,), "3 late": (50, 55, 60), "5 late": (40, 45, 50, 55, 60),
                         "3 spread": (40, 50, 60), "5 spread": (20, 30, 40, 50, 60)}),
    "mnist-mlp": Bench("mnist-mlp", recipes.load_mnist_bench, recipes.train_mnist_mlp,
                       lambda d: ground_truth.mnist_mlp_ground_truth(d, progress=False), 2048, (1, 2, 5, 10),
                       {"1": (30,), "3 late": (26, 28, 30), "5 late": (22, 24, 26, 28, 30),
                        "3 spread": (20, 25, 30), "5 spread": (10, 15, 20, 25, 30)}),
}


def cached_model(path: Path, make: Callable[[], Any], build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A trained model from ``path`` (a state dict) or trained by ``build`` and saved there."""
    if path.exists():
        model = make()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def member_models(bench: Bench, split: Any, seeds: list[int], cache_dir: str) -> list[torch.nn.Module]:
    """Independently trained members (the bench recipe with each seed), cached."""
    maker = _maker(bench)
    out = []
    for s in tqdm(seeds, desc=f"{bench.name}: train members", leave=False):
        path = Path(cache_dir) / "ensemble_models" / f"{bench.name}_seed{s}.pt"
        out.append(cached_model(path, maker, lambda: bench.train(seed=s, split=split)))
    return out


def checkpoint_models(bench: Bench, split: Any, epochs: list[int], cache_dir: str) -> list[torch.nn.Module]:
    """Checkpoints of the seed-0 run at ``epochs`` (one training run, cached per epoch)."""
    maker = _maker(bench)
    paths = [Path(cache_dir) / "ensemble_models" / f"{bench.name}_seed0_epoch{e}.pt" for e in epochs]
    if not all(p.exists() for p in paths):
        models = recipes.train_checkpoints(bench.name, epochs, seed=0, split=split)
        for p, mdl in zip(paths, models):
            p.parent.mkdir(parents=True, exist_ok=True)
            torch.save(mdl.state_dict(), p)
    return [cached_model(p, maker, lambda: None) for p in paths]


def _maker(bench: Bench) -> Callable[[], torch.nn.Module]:
    """An untrained model of the bench's architecture (weights are loaded over it)."""
    from sketchattr.bench.models.mlp import make_mlp

    return recipes.make_mnist_mlp if bench.name == "mnist-mlp" else make_mlp


def ensemble_member_scores(models: list[torch.nn.Module], split: Any, m: int, workdir: Path, tag: str,
                           seed: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """Every member's scores [C, n_query, n_train] through one EnsembleInfluence (disk stores, one
    HDF5 group per member) and per-member costs: featurize / fit / score seconds, store MiB."""
    path = workdir / f"{tag}.h5"
    t0 = time.perf_counter()
    feats, stores = featurize_members(models, sa.ClassificationTask(), split.train_dataset(), projector="sjlt", m=m,
                                      seed=seed, path=path, batch_size=250, progress=False)
    t1 = time.perf_counter()
    ens = EnsembleInfluence([sa.SketchedInfluence(featurizer=f) for f in feats]).fit(stores)
    t2 = time.perf_counter()
    scores = torch.stack(ens.member_scores(split.query_dataset())).double()
    t3 = time.perf_counter()
    c = len(models)
    cost = {"featurize_s": (t1 - t0) / c, "fit_s": (t2 - t1) / c, "score_s": (t3 - t2) / c,
            "store_MiB": path.stat().st_size / c / 2**20, "lambda_over_sigma_max": statistics.median(
                mem.damping_ / mem.sigma_max for mem in ens.members)}
    return scores, cost


def average(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """The ensemble's combination of member scores [C, nq, n] (EnsembleInfluence's rule): [nq, n]."""
    if normalize == "rms":
        scores = scores / scores.pow(2).mean(dim=2, keepdim=True).sqrt()
    return scores.mean(0)


def run_bench(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    split = bench.load()
    gt = bench.truth(args.cache_dir)
    lds_of = lambda s: float(lds(s.numpy(), gt).mean)
    n_seeds = max(bench.counts)
    models = member_models(bench, split, list(range(n_seeds)), args.cache_dir)
    epochs = sorted({e for es in bench.ckpt_sets.values() for e in es})
    ckpts = checkpoint_models(bench, split, epochs, args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        member, cost = ensemble_member_scores(models, split, bench.m, Path(tmp), "members")
        ck, _ = ensemble_member_scores(ckpts, split, bench.m, Path(tmp), "ckpts")
        n_sk = max(k for k in bench.counts if k <= 5)  # control: ONE model, n_sk independent sketches
        sk, _ = ensemble_member_scores([models[0]] * n_sk, split, bench.m, Path(tmp), "sketches", seed=100)
    res: dict[str, Any] = {"bench": bench.name, "m": bench.m, "cost_per_member": cost, "independent": {}, "checkpoints": {},
                           "sketches_of_one_model": {}}
    for k in (k for k in bench.counts if k <= n_sk):
        res["sketches_of_one_model"][str(k)] = lds_of(average(sk[:k], "none"))
    for k in bench.counts:
        groups = [list(range(g * k, (g + 1) * k)) for g in range(n_seeds // k)]
        for norm in ("none", "rms"):
            vals = [lds_of(average(member[g], norm)) for g in groups]
            res["independent"][f"{k}:{norm}"] = {"seed0_group": vals[0], "median": statistics.median(vals), "groups": len(vals)}
    where = {e: i for i, e in enumerate(epochs)}
    for name, es in bench.ckpt_sets.items():
        for norm in ("none", "rms"):
            res["checkpoints"][f"{name}:{norm}"] = {"epochs": list(es), "lds": lds_of(average(ck[[where[e] for e in es]], norm))}
    return res


def print_bench(res: dict[str, Any]) -> None:
    c = res["cost_per_member"]
    print(f"\n{res['bench']}: SJLT m = {res['m']}, damping='auto' per member (median λ/σ_max {c['lambda_over_sigma_max']:.1e}); "
          f"per member: featurize {c['featurize_s']:.1f} s, fit {c['fit_s']:.1f} s, score {c['score_s']:.2f} s, "
          f"store {c['store_MiB']:.1f} MiB")
    print(f"{'independent members':<22} {'LDS raw (seed-0 group)':>22} {'LDS raw (median)':>17} {'LDS rms (median)':>17} {'groups':>6}")
    counts = sorted({int(k.split(':')[0]) for k in res["independent"]})
    one = res["independent"]["1:none"]["median"]
    for k in counts:
        a, b = res["independent"][f"{k}:none"], res["independent"][f"{k}:rms"]
        print(f"{k:<22} {a['seed0_group']:>22.3f} {a['median']:>11.3f} ({a['median'] - one:+.3f}) {b['median']:>11.3f} "
              f"({b['median'] - one:+.3f}) {a['groups']:>6}")
    sk = res["sketches_of_one_model"]
    print("control, seed-0 model with k independent sketches (no model averaging): "
          + ", ".join(f"k={k}: {v:.3f}" for k, v in sk.items()))
    print(f"{'checkpoints of 1 run':<22} {'epochs':<22} {'LDS raw':>17} {'LDS rms':>17}")
    base = res["checkpoints"]["1:none"]["lds"]
    for name in dict.fromkeys(k.split(":")[0] for k in res["checkpoints"]):
        a, b = res["checkpoints"][f"{name}:none"], res["checkpoints"][f"{name}:rms"]
        print(f"{name:<22} {str(tuple(a['epochs'])):<22} {a['lds']:>9.3f} ({a['lds'] - base:+.3f}) {b['lds']:>9.3f} ({b['lds'] - base:+.3f})")


def plot(results: list[dict[str, Any]], path: str, trak: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        counts = sorted({int(k.split(':')[0]) for k in res["independent"]})
        for norm, style in (("none", "o-"), ("rms", "s--")):
            ax.plot(counts, [res["independent"][f"{k}:{norm}"]["median"] for k in counts], style,
                    label=f"ours, independent ({'raw' if norm == 'none' else 'RMS-normalized'} mean)")
        ck = [(len(v["epochs"]), v["lds"]) for k, v in res["checkpoints"].items() if k.endswith(":rms") and ("spread" in k or k == "1:rms")]
        ax.plot(*zip(*sorted(ck)), "^-", label="ours, checkpoints of 1 run (spread)")
        t = (trak or {}).get(res["bench"])
        for j, (p, by_k) in enumerate(sorted((t or {}).get("lds_by_proj_dim", {}).items(), key=lambda kv: -int(kv[0]))):
            tk = sorted(int(k) for k in by_k)
            ax.plot(tk, [by_k[str(k)] for k in tk], "x:", color=str(0.15 + 0.25 * j),
                    label=f"TRAK (traker 0.3.2), proj_dim {p}" + (" (= ours)" if int(p) == res["m"] else ""))
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(k) for k in counts])
        ax.set_xlabel("members")
        ax.set_ylabel("LDS")
        ax.set_title(f"{res['bench']} (m = {res['m']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benches", default="digits-mlp,mnist-mlp")
    ap.add_argument("--cache_dir", default=str(ROOT / "grad_cache"))
    ap.add_argument("--output", default=str(ROOT / "experiments/results/ensemble_members.json"))
    ap.add_argument("--plot", default=None, help="write the LDS-vs-members figure here (e.g. docs/ensemble_members.png)")
    ap.add_argument("--trak", default=str(ROOT / "experiments/results/ensemble_trak.json"),
                    help="TRAK figures from benchmarks/ensemble_trak.py to draw beside ours (if the file exists)")
    ap.add_argument("--quick", action="store_true", help="digits only, 1-3 members, m = 512")
    ap.add_argument("--replot", action="store_true", help="print and plot the saved --output figures, computing nothing")
    args = ap.parse_args()
    if args.replot:
        results = json.loads(Path(args.output).read_text())
        for res in results:
            print_bench(res)
        trak = json.loads(Path(args.trak).read_text()) if Path(args.trak).exists() else None
        plot(results, args.plot or str(ROOT / "docs/ensemble_members.png"), trak)
        return
    names = args.benches.split(",")
    if args.quick:
        names = ["digits-mlp"]
        b = BENCHES["digits-mlp"]
        BENCHES["digits-mlp"] = Bench(b.name, b.load, b.train, b.truth, 512, (1, 3), {"1": (60,), "3 spread": (40, 50, 60)})
    results = []
    for name in tqdm(names, desc="benches"):
        res = run_bench(BENCHES[name], args)
        print_bench(res)
        results.append(res)
    if not args.quick:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
    if args.plot:
        trak = json.loads(Path(args.trak).read_text()) if args.trak and Path(args.trak).exists() else None
        plot(results, args.plot, trak)


if __name__ == "__main__":
    main()

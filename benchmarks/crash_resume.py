"""Kill it anywhere, run it again: SIGKILL at random instants of featurization, factor fitting and
score writing, then the same command to completion, compared bit for bit with an uninterrupted run.

Each trial starts a fresh process that runs one stage on a small MLP (disk store, EKFAC factors
folder, or score file), kills it with SIGKILL after a random delay drawn uniformly over the stage's
uninterrupted working time (after imports; so kills land in creation, writing, flushing and closing
alike), then runs
the same stage again in a new process and compares its output with the reference:

* featurize: the store's rows and indices;
* fit_factors: every factor tensor (covariances, eigenbases, corrected eigenvalues);
* score_to_hdf5: the score matrix and train indices.

    python benchmarks/crash_resume.py               # 20 kills per stage (~3 min on 2 cores)
    python benchmarks/crash_resume.py --quick       # 4 per stage

Bit-identity assumes the same torch thread count in both runs (each child pins 1 thread).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import sys, torch
torch.set_num_threads(1)
import sketchattr as sa
from torch import nn
stage, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).double()
g = torch.Generator().manual_seed(1)
x = torch.randn(3000, 32, generator=g, dtype=torch.float64)
y = torch.randint(0, 10, (3000,), generator=g)
task = sa.ClassificationTask()
feat = sa.Featurizer(model, task, projector="sjlt", m=512, seed=0, batch_size=50, progress=False)
print("start", flush=True)
if stage == "featurize":
    feat.featurize((x, y), store=sa.DiskStore(out + "/store.h5", buffer_bytes=0))
elif stage == "fit_factors":
    sa.fit_factors(model, task, (x, y), kind="ekfac", fisher="empirical", batch_size=50, path=out + "/factors", progress=False)
else:
    store = feat.featurize((x[:600], y[:600]))
    scorer = sa.SketchedInfluence(damping=0.1, block_rows=16).fit(store)
    scorer.score_to_hdf5(feat.query_rows((x[:400], y[:400])), out + "/scores.h5")
print("done", flush=True)
'''


def run(stage: str, out: Path, kill_after: float | None) -> tuple[int, float]:
    """Run the stage; ``kill_after``: SIGKILL that many seconds after its work starts (imports done).
    Returns (exit code, seconds of work)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, stage, str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # "start": imports and setup done
    t0 = time.perf_counter()
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    if kill_after is None and proc.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{err[-3000:]}")
    return proc.returncode, time.perf_counter() - t0


def outputs(stage: str, out: Path) -> dict:
    """The stage's results as numpy arrays, read from its files."""
    import h5py
    import torch

    import sketchattr as sa

    if stage == "featurize":
        store = sa.DiskStore(out / "store.h5")
        return {"rows": store.rows().numpy(), "indices": store.indices}
    if stage == "fit_factors":
        factors = sa.Factors.load(out / "factors")
        return {f"{m}/{k}": t.numpy() for m, d in factors.tensors.items() for k, t in d.items() if isinstance(t, torch.Tensor)}
    with h5py.File(out / "scores.h5", "r") as f:
        return {k: f[k][()] for k in f}


def same(a: dict, b: dict) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="kills per stage")
    ap.add_argument("--stages", default="featurize,fit_factors,score_to_hdf5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    trials = 4 if args.quick else args.trials
    rng = random.Random(args.seed)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            ref_dir = Path(tmp) / f"{stage}_ref"
            ref_dir.mkdir()
            _, full = run(stage, ref_dir, None)
            ref = outputs(stage, ref_dir)
            ok, killed = 0, 0
            for t in tqdm(range(trials), desc=f"{stage}: kill + resume"):
                work = Path(tmp) / f"{stage}_{t}"
                work.mkdir()
                code, _ = run(stage, work, rng.uniform(0.0, full))
                killed += code == -signal.SIGKILL
                try:
                    run(stage, work, None)  # the same command again
                    ok += same(outputs(stage, work), ref)
                except Exception as exc:  # noqa: BLE001 - a failed resume is what the harness counts
                    tqdm.write(f"  {stage} trial {t}: resume failed: {exc}")
            report[stage] = {"resumed_bit_identical": ok, "trials": trials, "killed_mid_run": killed, "run_seconds": full}
            print(f"{stage:<14} {ok}/{trials} resumed bit-identical ({killed} killed mid-run, "
                  f"the rest finished before the kill; an uninterrupted run takes {full:.1f} s)", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

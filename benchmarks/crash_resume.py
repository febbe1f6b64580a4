"""Kill it anywhere, run it again: SIGKILL at random instants of featurization, factor fitting and
score writing, then the same command to completion, compared bit for bit with an uninterrupted run.

Each trial starts a fresh process that runs one stage on a small MLP (disk store, EKFAC factors
folder, or score file), kills it with SIGKILL after a random delay drawn uniformly over the stage's
uninterrupted working time (after imports; so kills land in creation, writing, flushing and closing
alike), then runs
the same stage again in a new process and compares its output with the reference:

* featurize: the store's rows and indices;
* fit_factors: every factor tensor (covariances, eigenbases, corrected eigenvalues);
* score_to_hdf5: the score matrix and train indices;
* featurize_2ranks / fit_factors_2ranks / score_to_hdf5_2ranks: the same over two gloo ranks
  (``sketchattr.distributed.featurize``, ``fit_factors(collective=)``, sharded scoring); one rank
  (chosen at random) is killed, the survivor must stop by itself within 60 s (the heartbeat names the dead
  rank; a kill before the heartbeats run is bounded by the process group's 15 s timeout), then both
  ranks rerun; the joined store's rows are compared with the one-process rows.

    python benchmarks/crash_resume.py               # 20 kills per stage (~5 min on 2 cores)
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
elif stage.endswith("_2ranks"):
    import torch.distributed as dist
    import sketchattr.distributed as sad
    from datetime import timedelta
    dist.init_process_group("gloo", timeout=timedelta(seconds=15))  # bounds a kill before the heartbeats start
    c = sad.get_collective(stale_after=3.0)
    if stage == "featurize_2ranks":
        sad.featurize(feat, (x, y), path=out + "/store.h5", collective=c, buffer_bytes=0)
    elif stage == "fit_factors_2ranks":
        sa.fit_factors(model, task, (x, y), kind="ekfac", fisher="empirical", batch_size=50, path=out + "/factors",
                       collective=c, progress=False)
    else:
        shard = sad.featurize(feat, (x[:600], y[:600]), collective=c)
        scorer = sa.SketchedInfluence(damping=0.1, block_rows=16).fit(shard, collective=c)
        scorer.score_to_hdf5(feat.query_rows((x[:400], y[:400])), out + "/scores.h5")
    dist.barrier()
    dist.destroy_process_group()
elif stage == "fit_factors":
    sa.fit_factors(model, task, (x, y), kind="ekfac", fisher="empirical", batch_size=50, path=out + "/factors", progress=False)
else:
    store = feat.featurize((x[:600], y[:600]))
    scorer = sa.SketchedInfluence(damping=0.1, block_rows=16).fit(store)
    scorer.score_to_hdf5(feat.query_rows((x[:400], y[:400])), out + "/scores.h5")
print("done", flush=True)
'''


def run(stage: str, out: Path, kill_after: float | None, rng: random.Random | None = None) -> tuple[int, float]:
    """Run the stage (two rank processes for ``featurize_2ranks``); ``kill_after``: SIGKILL (one random
    rank) that many seconds after its work starts (imports done). Returns (exit code, seconds of work)."""
    world = 2 if stage.endswith("_2ranks") else 1
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, stage, str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        p.stdout.readline()  # "start": imports and setup done
    t0 = time.perf_counter()
    code = 0
    if kill_after is not None:
        victim = procs[(rng or random).randrange(world)]
        try:
            victim.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            victim.send_signal(signal.SIGKILL)
            code = -signal.SIGKILL
        killed_at = time.perf_counter()
        for p in procs:  # the survivors must stop by themselves (heartbeat), promptly
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError(f"{stage}: a surviving rank did not stop within 60 s of the kill")
        if code and world > 1:
            STOP_SECONDS.append(time.perf_counter() - killed_at)
    errs = [p.communicate()[1] for p in procs]
    if kill_after is None and any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"{stage} failed:\n{errs[0][-2000:]}\n{errs[-1][-2000:]}")
    return code, time.perf_counter() - t0


STOP_SECONDS: list[float] = []  # two-rank runs: kill -> every survivor stopped


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(stage: str, out: Path) -> dict:
    """The stage's results as numpy arrays, read from its files."""
    import h5py
    import torch

    import sketchattr as sa

    stage = stage.removesuffix("_2ranks")
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
    ap.add_argument("--stages", default="featurize,fit_factors,score_to_hdf5,featurize_2ranks,fit_factors_2ranks,score_to_hdf5_2ranks")
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
            if stage == "featurize_2ranks":  # the joined two-rank store must equal the one-process rows
                one = Path(tmp) / "featurize_ref"
                if not one.exists():
                    one.mkdir()
                    run("featurize", one, None)
                assert same(ref, outputs("featurize", one)), "two-rank rows differ from one-process rows"
            ok, killed = 0, 0
            for t in tqdm(range(trials), desc=f"{stage}: kill + resume"):
                work = Path(tmp) / f"{stage}_{t}"
                work.mkdir()
                code, _ = run(stage, work, rng.uniform(0.0, full), rng)
                killed += code == -signal.SIGKILL
                try:
                    run(stage, work, None)  # the same command again
                    ok += same(outputs(stage, work), ref)
                except Exception as exc:  # noqa: BLE001 - a failed resume is what the harness counts
                    tqdm.write(f"  {stage} trial {t}: resume failed: {exc}")
            report[stage] = {"resumed_bit_identical": ok, "trials": trials, "killed_mid_run": killed, "run_seconds": full}
            if stage.endswith("_2ranks") and STOP_SECONDS:
                report[stage]["survivor_stop_seconds_max"] = max(STOP_SECONDS)
                print(f"{'':<14} survivors stopped by themselves within {max(STOP_SECONDS):.1f} s of a kill "
                      f"(median {sorted(STOP_SECONDS)[len(STOP_SECONDS) // 2]:.1f} s)")
                STOP_SECONDS.clear()
            print(f"{stage:<14} {ok}/{trials} resumed bit-identical ({killed} killed mid-run, "
                  f"the rest finished before the kill; an uninterrupted run takes {full:.1f} s)", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

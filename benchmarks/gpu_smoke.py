"""On a CUDA machine: the digits-mlp pipeline on the GPU (SJLT kernel when `sjlt` loads) against
the same pipeline on the CPU, for each store kind. Prints backends, seconds and agreement.

    python benchmarks/gpu_smoke.py [--quick]        # --quick: the memory store only

A progress bar (stderr) counts the store kinds.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from sketchattr import ClassificationTask, Featurizer, SketchedInfluence
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.recipes import train_digits_mlp
from sketchattr.store import CPUStore, DiskStore, MemoryStore
from sketchattr.bench.ground_truth import digits_ground_truth
from sketchattr.validate.lds import lds


def run(model, split, device: str, store, m: int = 1024):
    model = model.to(device)
    feat = Featurizer(model, ClassificationTask(), projector="sjlt", m=m, seed=0, batch_size=250, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feat.featurize(split.train_dataset(), store=store)
    queries = feat.query_rows(split.query_dataset())
    scorer = SketchedInfluence(device=device).fit(store)
    scores = scorer.score(queries)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, scores.double().cpu(), feat.projector.backend_used, scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the memory store only (the CPU reference and one CUDA run)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    split = load_digits_split()
    model = train_digits_mlp(seed=0, split=split)
    gt = digits_ground_truth()
    run(model, split, "cuda", MemoryStore())  # warm-up
    _, ref, backend_cpu, _ = run(model, split, "cpu", MemoryStore())
    print(f"{'device':<6} {'store':<7} {'backend':<10} {'seconds':>8} {'LDS':>6} {'max |Δ| vs cpu':>15} {'pinned':>6}")
    print(f"{'cpu':<6} {'memory':<7} {backend_cpu:<10} {'':>8} {lds(ref.numpy(), gt.masks, gt.outputs).mean:>6.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"memory": MemoryStore, "cpu": CPUStore, "disk": lambda: DiskStore(f"{tmp}/s.h5")}
        for name in tqdm(["memory"] if args.quick else list(stores), desc="cuda stores", unit="store"):
            store = stores[name]()
            sec, scores, backend, _ = run(model, split, "cuda", store)
            rel = float((scores - ref).abs().max() / ref.abs().max())
            pinned = bool(store.rows().is_pinned()) if name == "cpu" else ""
            tqdm.write(f"{'cuda':<6} {name:<7} {backend:<10} {sec:>8.3f} {lds(scores.numpy(), gt.masks, gt.outputs).mean:>6.3f} {rel:>15.2e} {pinned!s:>6}")


if __name__ == "__main__":
    main()

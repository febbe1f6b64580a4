"""Featurize → disk against featurize → memory: does the HDF5 store slow featurization down?

Two models: digits-mlp (9,610 params, 1,000 bundled rows) and a synthetic MLP of ≥ 1M params on
random inputs. For each, featurize the same rows into a MemoryStore and into a fresh DiskStore,
repeat, and print the medians and the ratio (bar: disk ≤ 1.2 × memory).

    python benchmarks/store_throughput.py [--repeats 5] [--m 1024] [--n_synth 2000]
    python benchmarks/store_throughput.py --quick      # 2 repeats, 300 synthetic rows

A progress bar (stderr) counts the timed featurize calls.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sketchattr import ClassificationTask, Featurizer
from sketchattr.bench.data.digits import load_digits_split
from sketchattr.bench.recipes import train_digits_mlp
from sketchattr.store import DiskStore, MemoryStore


def synthetic_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))


def time_featurize(feat: Featurizer, dataset, store_factory) -> float:
    """Seconds of one featurize call into a fresh store (the featurizer, like a user's, is reused)."""
    store = store_factory()
    t0 = time.perf_counter()
    feat.featurize(dataset, store=store)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--n_synth", type=int, default=1000)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="2 repeats, 300 synthetic rows (a smoke run; ratios are noisy)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.n_synth = min(args.repeats, 2), min(args.n_synth, 300)

    split = load_digits_split()
    synth_x = torch.randn(args.n_synth, 784, generator=torch.Generator().manual_seed(0))
    synth_y = torch.randint(0, 10, (args.n_synth,), generator=torch.Generator().manual_seed(1))
    cases = [
        ("digits-mlp", train_digits_mlp(seed=0, split=split), split.train_dataset()),
        ("synthetic-mlp", synthetic_mlp(), torch.utils.data.TensorDataset(synth_x, synth_y)),
    ]
    print(f"{'model':<14} {'params':>10} {'rows':>6} {'m':>5} {'memory s':>9} {'disk s':>8} {'disk/memory':>11} {'disk rows/s':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, dataset in cases:
            n_params = sum(p.numel() for p in model.parameters())
            feat = Featurizer(model, ClassificationTask(), projector="sjlt", m=args.m, seed=0, batch_size=args.batch_size, progress=False)
            time_featurize(feat, dataset, MemoryStore)  # warm-up: projector chunks, allocator
            mem, disk = [], []
            for r in tqdm(range(args.repeats), desc=f"{name}: memory + disk", unit="repeat", leave=False):  # interleaved, so machine noise hits both alike
                mem.append(time_featurize(feat, dataset, MemoryStore))
                path = Path(tmp) / f"{name}-{r}.h5"
                disk.append(time_featurize(feat, dataset, lambda: DiskStore(path)))
            mm, dm = statistics.median(mem), statistics.median(disk)
            tqdm.write(f"{name:<14} {n_params:>10,} {len(dataset):>6} {args.m:>5} {mm:>9.3f} {dm:>8.3f} {dm / mm:>11.2f} {len(dataset) / dm:>11,.0f}")


if __name__ == "__main__":
    main()

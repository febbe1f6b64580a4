"""Samples/s and peak memory of featurization paths against a plain training step.

Paths: (a) a plain training step (forward, backward, SGD step); (b) ``torch.func.vmap``
per-example gradients + SJLT (m = 2048); (c) the hook engine's exact per-example gradients +
the same SJLT (identical sketch); (d) vmap + a dense Gaussian projection (TRAK-style: its d × m
matrix is drawn chunk by chunk for every batch, so one batch is timed); (e) the factorized
(Kronecker, 32 × 32 per block) and (f) the FactGraSS-style (m = 2048) sketches, which the hook
engine feeds from the layer factors. Every path attributes through *all* parameters.

Models: a 235,146-parameter MLP (784-256-128-10) on 3,000 real images (sklearn's digits
upsampled to 28 × 28, repeated) and the ``gpt-14m`` GPT preset (13.8M parameters, 64 random
tokens a sequence). Each path runs in its own process (peak memory is its own: CPU ru_maxrss,
CUDA max_memory_allocated) with one featurizer (or optimizer): an untimed warm-up pass (the
featurizer's first-batch check, random chunks drawn, buffers allocated), then ``--repeats``
timed passes over the same rows, i.e. steady-state throughput; the table gives the median and
ratios to the training step and to vmap + SJLT.

    python benchmarks/featurize_throughput.py [--quick] [--repeats 3] [--device cuda]

Each path's worker shows a progress bar per pass on stderr (``--no_progress``: none).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

PATHS = ("train", "vmap+sjlt", "hooks+sjlt", "vmap+gaussian", "factorized", "factgrass")
MODELS = {"mlp": 256, "gpt": 16}  # batch size on CPU (x4 on CUDA)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def digits_28(n: int) -> torch.utils.data.TensorDataset:
    """sklearn's 8 × 8 digits, bilinearly upsampled to 28 × 28 and flattened, repeated to n rows."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)
    idx = torch.arange(n) % len(x)
    return torch.utils.data.TensorDataset(x[idx], torch.tensor(d.target)[idx])


def case(name: str, rows: int):
    import sketchattr as sa
    from sketchattr.bench.data.synthetic import RandomTokens
    from sketchattr.bench.models.gpt import PRESETS, make_gpt
    from sketchattr.task import CausalLMTask

    if name == "gpt":
        cfg = PRESETS["gpt-14m"]
        return make_gpt(cfg, seed=0), CausalLMTask(), RandomTokens(rows, cfg.seq_len, cfg.vocab, seed=0)
    return mlp(), sa.ClassificationTask(), digits_28(rows)


def projector(sa, path: str):
    return {
        "vmap+sjlt": lambda: sa.SJLTProjector(2048, seed=0),
        "hooks+sjlt": lambda: sa.SJLTProjector(2048, seed=0),
        "vmap+gaussian": lambda: sa.GaussianProjector(2048, seed=0),
        "factorized": lambda: sa.FactorizedProjector(32, 32, seed=0),
        "factgrass": lambda: sa.FactGraSSProjector(2048, seed=0),
    }[path]()


def worker(name: str, path: str, batch: int, rows: int, repeats: int, device: str, progress: bool = True) -> None:
    import sketchattr as sa
    from tqdm.auto import tqdm

    torch.set_num_threads(2) if device == "cpu" else None
    model, task, data = case(name, rows)
    model.to(device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if path == "vmap+gaussian":  # drawing P (d x m) dominates and is redone per batch: one batch
        rows, repeats = batch, 1
    subset = torch.utils.data.Subset(data, range(rows))

    engine = "vmap" if path.startswith("vmap") else "auto"
    feat = None if path == "train" else sa.Featurizer(model, task, projector=projector(sa, path), batch_size=batch,
                                                      progress=progress, engine=engine)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every pass sees the same model

    def once() -> float:
        sync()
        t0 = time.perf_counter()
        if feat is None:
            model.train()
            for b in tqdm(torch.utils.data.DataLoader(subset, batch_size=batch), desc="train steps", unit="batch", disable=not progress):
                b = b.to(device) if isinstance(b, torch.Tensor) else tuple(t.to(device) for t in b)
                opt.zero_grad()
                task.train_loss(model, b).div(len(b[0]) if isinstance(b, (tuple, list)) else len(b)).backward()
                opt.step()
        else:
            feat.train_rows(subset)
            if engine == "auto" and not feat.uses_hooks:
                raise RuntimeError(f"{path} did not run on the hook engine: {feat.describe()}")
        sync()
        return time.perf_counter() - t0

    if path != "vmap+gaussian":
        once()  # warm-up (allocator, caches, first-batch check)
    secs = [once() for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples_per_s": rows / statistics.median(secs), "peak_mb": peak,
                      "params": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows (MLP 768, GPT 32) and one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mlp,gpt")
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, batch=args.batch, rows=args.rows, repeats=args.repeats, device=args.device, progress=not args.no_progress)
        return
    cuda = args.device.startswith("cuda")
    repeats = 1 if args.quick else args.repeats
    mem = "peak CUDA MB" if cuda else "peak RSS MB"
    for name in args.models.split(","):
        batch = MODELS[name] * (4 if cuda else 1)
        rows = {"mlp": 768 if args.quick else 3000, "gpt": 32 if args.quick else 128}[name] * (4 if cuda else 1)
        res = {}
        for k, path in enumerate(PATHS, 1):
            print(f"[{k}/{len(PATHS)}] {name}: {path} (own process: warm-up pass + {repeats} timed)", flush=True, file=sys.stderr)
            cmd = [sys.executable, __file__, "--worker", name, path, "--batch", str(batch), "--rows", str(rows),
                   "--repeats", str(repeats), "--device", args.device] + (["--no_progress"] if args.no_progress else [])
            run = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress bars, errors) passes through
            if run.returncode:
                raise RuntimeError(f"{name}/{path} failed (its traceback is above)")
            res[path] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"  {name}: {path}: {res[path]['samples_per_s']:.3g} samples/s", file=sys.stderr)
        train, vmap = res["train"], res["vmap+sjlt"]
        print(f"\n{name}: {train['params']:,} params, {rows} rows, batch {batch}" + (" x 64 tokens" if name == "gpt" else "")
              + f", {args.device}, median of {repeats}")
        print(f"| path | samples/s | × train | × vmap+SJLT | {mem} | memory × train |")
        print("|---|---|---|---|---|---|")
        for path, r in res.items():
            print(f"| {path} | {r['samples_per_s']:.4g} | {r['samples_per_s'] / train['samples_per_s']:.2f} | "
                  f"{r['samples_per_s'] / vmap['samples_per_s']:.2f} | {r['peak_mb']:.0f} | {r['peak_mb'] / train['peak_mb']:.2f} |")


if __name__ == "__main__":
    main()

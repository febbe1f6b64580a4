"""Samples/s and peak memory of (a) a plain training step, (b) vmap per-example gradients + dense
SJLT projection (m = 1024), (c) the factorized (Kronecker, 32×32 per module) sketch and (d) the
FactGraSS-style sketch (m = 1024), on a ≥ 10M-parameter GPT-style model on random tokens
(``sketchattr.models.gpt`` preset ``gpt-14m`` on ``sketchattr.data.synthetic.RandomTokens``) and a
1.33M-parameter MLP. Each path runs in its own subprocess so its peak memory is its own (CPU:
ru_maxrss; CUDA: torch.cuda.max_memory_allocated). Sketches cover every Linear layer (embeddings
and LayerNorms are not Linear; they are excluded from (b) too, so all paths see the same
parameters). (b) also runs with a dense Gaussian projection (TRAK-style; its d × m matrix is
drawn chunk by chunk for every batch, so one batch is timed). On CUDA, (b) runs with the ``sjlt``
kernel when it loads and with the torch SJLT (``backend="torch"``). ``vs vmap`` is against
vmap + SJLT, the fastest (b); ``vs dense`` against vmap + the dense Gaussian projection.

    python benchmarks/factorized_throughput.py [--batches 3] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))


def case(name: str, batch: int):
    import sketchattr as sa
    from sketchattr.data.synthetic import RandomTokens
    from sketchattr.models.gpt import PRESETS, make_gpt
    from sketchattr.task import CausalLMTask

    g = torch.Generator().manual_seed(0)
    if name == "gpt":
        cfg = PRESETS["gpt-14m"]
        model, task = make_gpt(cfg, seed=0), CausalLMTask()
        data = RandomTokens(batch * 64, cfg.seq_len, cfg.vocab, seed=0)
    else:
        model, task = mlp(), sa.ClassificationTask()
        data = torch.utils.data.TensorDataset(torch.randn(batch * 64, 784, generator=g), torch.randint(0, 10, (batch * 64,), generator=g))
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return model, task, data, linear


PATHS = {
    "train": None,
    "vmap+sjlt": lambda sa: sa.SJLTProjector(1024, seed=0),
    "vmap+sjlt-torch": lambda sa: sa.SJLTProjector(1024, seed=0, backend="torch"),
    "vmap+gaussian": lambda sa: sa.GaussianProjector(1024, seed=0),
    "factorized": lambda sa: sa.FactorizedProjector(32, 32, seed=0),
    "factgrass": lambda sa: sa.FactGraSSProjector(1024, seed=0),
}


def worker(name: str, path: str, batch: int, batches: int, device: str) -> None:
    import sketchattr as sa

    torch.set_num_threads(2)
    model, task, data, linear = case(name, batch)
    model.to(device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = batch * batches
    if path == "train":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=batch)
        it = iter(loader)
        model.train()
        t0 = None
        for i in range(batches + 1):  # first batch is warm-up
            if i == 1:
                sync()
                t0 = time.perf_counter()
            b = next(it)
            b = b.to(device) if isinstance(b, torch.Tensor) else tuple(t.to(device) for t in b)
            opt.zero_grad()
            task.train_loss(model, b).div(batch).backward()
            opt.step()
        sync()
        sec = time.perf_counter() - t0
    else:
        projector = PATHS[path](sa)
        feat = sa.Featurizer(model, task, modules=linear, projector=projector, batch_size=batch, progress=False)
        if path == "vmap+gaussian":  # one timed batch, no warm-up: drawing P (d x m) dominates and is redone per batch
            n = batch
        else:
            feat.train_rows(torch.utils.data.Subset(data, range(batch)))  # warm-up
        sync()
        t0 = time.perf_counter()
        feat.train_rows(torch.utils.data.Subset(data, range(batch, batch + n)))
        sync()
        sec = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backend = getattr(projector, "backend_used", None) if path != "train" else None
    print(json.dumps({"samples_per_s": n / sec, "peak_mb": peak, "params": params, "backend": backend}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 8 for gpt, 64 for mlp; x4 on CUDA)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, batch=args.batch, batches=args.batches, device=args.device)
        return
    cuda = args.device.startswith("cuda")
    paths = [p for p in PATHS if cuda or p != "vmap+sjlt-torch"]  # on CPU both (b) rows are the torch SJLT
    mem = "peak CUDA MB" if cuda else "peak RSS MB"
    for name, batch in (("gpt", 8), ("mlp", 64)):
        batch = args.batch or batch * (4 if cuda else 1)
        res = {}
        for path in paths:
            cmd = [sys.executable, __file__, "--worker", name, path, "--batch", str(batch), "--batches", str(args.batches),
                   "--device", args.device]
            res[path] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"\n{name}: {res['train']['params']:,} params, batch {batch}" + (" x 64 tokens" if name == "gpt" else "") + f", {args.device}")
        dense = res.get("vmap+gaussian")
        print(f"{'path':<16} {'backend':<10} {'samples/s':>10} {mem:>12} {'vs train':>9} {'vs vmap':>8} {'vs dense':>9} {'mem vs train':>13}")
        for path, r in res.items():
            vs_dense = f"{r['samples_per_s'] / dense['samples_per_s']:>8.0f}x" if dense else f"{'-':>9}"
            print(f"{path:<16} {r['backend'] or '-':<10} {r['samples_per_s']:>10.3g} {r['peak_mb']:>12.0f} "
                  f"{r['samples_per_s'] / res['train']['samples_per_s']:>8.2f}x "
                  f"{r['samples_per_s'] / res['vmap+sjlt']['samples_per_s']:>7.1f}x {vs_dense} {r['peak_mb'] / res['train']['peak_mb']:>12.2f}x")


if __name__ == "__main__":
    main()

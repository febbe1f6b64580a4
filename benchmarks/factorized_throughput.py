"""Samples/s and peak memory of (a) a plain training step, (b) vmap per-example gradients + dense
SJLT projection, (c) the factorized (Kronecker) sketch, on a ≥ 10M-parameter GPT-style model on
random tokens (``sketchattr.models.gpt`` preset ``gpt-14m`` on ``sketchattr.data.synthetic.RandomTokens``)
and a 1.33M-parameter MLP. Each path runs in its own subprocess so its peak RSS
(ru_maxrss) is its own. Sketches cover every Linear layer (embeddings and LayerNorms are not
Linear; they are excluded from (b) too, so (b) and (c) see the same parameters).

    python benchmarks/factorized_throughput.py [--batches 3]
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


def worker(name: str, path: str, batch: int, batches: int) -> None:
    import sketchattr as sa

    torch.set_num_threads(2)
    model, task, data, linear = case(name, batch)
    n = batch * batches
    if path == "train":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=batch)
        it = iter(loader)
        model.train()
        t0 = None
        for i in range(batches + 1):  # first batch is warm-up
            if i == 1:
                t0 = time.perf_counter()
            b = next(it)
            opt.zero_grad()
            task.train_loss(model, b).div(batch).backward()
            opt.step()
        sec = time.perf_counter() - t0
    else:
        projector = sa.FactorizedProjector(32, 32, seed=0) if path == "factorized" else "sjlt"
        feat = sa.Featurizer(model, task, modules=linear, projector=projector, m=None if path == "factorized" else 1024,
                             batch_size=batch, progress=False)
        feat.train_rows(torch.utils.data.Subset(data, range(batch)))  # warm-up
        t0 = time.perf_counter()
        feat.train_rows(torch.utils.data.Subset(data, range(batch, batch + n)))
        sec = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"samples_per_s": n / sec, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": params}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, batch=args.batch, batches=args.batches)
        return
    for name, batch in (("gpt", 8), ("mlp", 64)):
        res = {}
        for path in ("train", "vmap+sjlt", "factorized"):
            out = subprocess.run([sys.executable, __file__, "--worker", name, path, "--batch", str(batch), "--batches", str(args.batches)],
                                 capture_output=True, text=True, check=True).stdout
            res[path] = json.loads(out.strip().splitlines()[-1])
        print(f"\n{name}: {res['train']['params']:,} params, batch {batch}" + (" x 64 tokens" if name == "gpt" else ""))
        print(f"{'path':<12} {'samples/s':>10} {'peak RSS MB':>12} {'vs train':>9} {'vs vmap':>8} {'mem vs train':>13}")
        for path, r in res.items():
            print(f"{path:<12} {r['samples_per_s']:>10.1f} {r['peak_rss_mb']:>12.0f} {r['samples_per_s'] / res['train']['samples_per_s']:>8.2f}x "
                  f"{r['samples_per_s'] / res['vmap+sjlt']['samples_per_s']:>7.1f}x {r['peak_rss_mb'] / res['train']['peak_rss_mb']:>12.2f}x")


if __name__ == "__main__":
    main()

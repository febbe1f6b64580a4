"""Models larger than one device: per-rank peak memory and throughput of featurizing an FSDP2-sharded
GPT-2-small-shaped model (124M parameters, random init), next to its training step, on 1, 2 and 4
gloo ranks (CPU).

Each configuration runs in fresh processes (peak RSS is per process): the unsharded model in one
process, then ``fully_shard`` per block and at the root on W = 1, 2, 4 ranks. The sharded model is
built on the meta device and materialised shard by shard (``to_empty`` + ``init_weights``), so no
rank ever holds the whole model. Per configuration and phase:

* ``train`` — forward, backward and an SGD step on ``--batch_size`` sequences of ``--seq_len``
  tokens per rank (what training the sharded model costs);
* ``featurize`` — ``sketchattr.distributed.featurize`` of ``--num_train`` sequences per rank into a
  disk store, TensorSketch (or ``--projector sjlt``) with m = 8,192, every module attributed.

Printed: per-rank peak RSS (max over ranks; and above the import baseline; glibc's mmap threshold
fixed, see :data:`MMAP_THRESHOLD`), its ratio to the unsharded run, throughput in sequences/s over all ranks (after one warm-up batch), and featurize
throughput as a fraction of the training step's (the limit is about one forward and one backward
per example, plus forming and sketching each example's gradient).

    python benchmarks/sharded_memory.py            # GPT-2 small, W = 1, 2, 4 (about 15 min on 2 cores)
    python benchmarks/sharded_memory.py --quick    # a 4-layer 256-wide GPT-2, W = 1, 2
    python benchmarks/sharded_memory.py --device cuda --worlds 1 2 4 8   # on a GPU machine (NCCL)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QUICK = dict(n_layer=4, n_embd=256, n_head=4, vocab=8192)
MMAP_THRESHOLD = 2**20
"""glibc malloc's mmap threshold in every run (bytes). Its default grows with the largest buffer freed,
after which FSDP's per-block gathers (tens of MB) land on the heap and fragment it: resident memory
then grows by hundreds of MB per step whatever the code does. Fixed at 1 MiB, freed buffers go back
to the OS and peak RSS measures what is live."""
FULL = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257)


def rss_mib() -> float:
    """This process's peak resident set size so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(shape: dict, sharded: bool, device: str = "cpu"):
    """GPT-2 of ``shape`` (random init, float32); sharded: built on the meta device, fully_shard-ed per
    block and at the root, then each rank materialises and initialises only its shards."""
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=shape["vocab"], n_positions=1024, n_embd=shape["n_embd"], n_layer=shape["n_layer"],
                        n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    if not sharded:
        return tf.GPT2LMHeadModel(cfg).to(device)
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device=device)
    model.init_weights()
    model.tie_weights()
    return model


def tokens(n: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def worker(args: argparse.Namespace) -> dict:
    """One rank: build the model, run the phase, report seconds and peak RSS."""
    import torch.distributed as dist

    import sketchattr as sa
    import sketchattr.distributed as sad

    torch.set_num_threads(1)
    base = rss_mib()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = args.layout == "fsdp"
    device = "cpu"
    if args.device == "cuda":  # one GPU per rank, NCCL: the same code path as gloo on the CPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if world > 1 or sharded:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    shape = QUICK if args.quick else FULL
    model = build(shape, sharded, device)
    params = sum(p.numel() for p in model.parameters())
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())
    task = sa.CausalLMTask()
    out: dict = {"rank": rank, "params": params, "import_rss_mib": base, "shard_mib": local / 2**20}
    if args.phase == "train":
        data = tokens(args.batch_size * (args.steps + 1), args.seq_len, shape["vocab"], seed=rank)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        batches = [{k: v.to(device) for k, v in torch.utils.data.default_collate(data[i:i + args.batch_size]).items()}
                   for i in range(0, len(data), args.batch_size)]
        for i, batch in enumerate(batches):
            if i == 1:
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            task.train_loss(model, batch).backward()
            opt.step()
        out["seconds"], out["sequences"] = time.perf_counter() - t0, args.batch_size * args.steps
    else:
        n = args.num_train * world
        warm = tokens(args.batch_size * world, args.seq_len, shape["vocab"], seed=99)
        data = tokens(n, args.seq_len, shape["vocab"], seed=1)
        feat = sa.Featurizer(model, task, projector=args.projector, m=args.m, seed=0, batch_size=args.batch_size, progress=False)
        c, folder = sad.get_collective(), Path(args.folder)
        sad.featurize(feat, warm, path=folder / "warm.h5", collective=c)  # the check against autograd, once
        t0 = time.perf_counter()
        sad.featurize(feat, data, path=folder / "store.h5", collective=c)
        out["seconds"], out["sequences"] = time.perf_counter() - t0, args.num_train
    out["peak_rss_mib"] = rss_mib() if args.device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    if args.device == "cuda":
        out["import_rss_mib"] = 0.0  # GPU memory: all of it is the run's
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out


def launch(args: argparse.Namespace, layout: str, world: int, phase: str, folder: str) -> list[dict]:
    """Run this script as ``world`` ranks (gloo, one thread each) for one configuration and phase;
    stores go to ``folder`` (shared by the ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, __file__, "--worker", "--layout", layout, "--phase", phase, "--seq_len", str(args.seq_len),
            "--batch_size", str(args.batch_size), "--num_train", str(args.num_train), "--steps", str(args.steps),
            "--projector", args.projector, "--m", str(args.m), "--folder", folder, "--device", args.device] + (["--quick"] if args.quick else [])
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                   MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{layout} W={world} {phase} failed (exit status {p.returncode}):\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 4-layer, 256-wide GPT-2 and W = 1, 2 only")
    p.add_argument("--worlds", type=int, nargs="+", default=None, help="rank counts (default 1 2 4; --quick: 1 2)")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2, help="sequences per rank per step / featurize batch")
    p.add_argument("--num_train", type=int, default=8, help="sequences featurized per rank (after a warm-up batch)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after a warm-up step)")
    p.add_argument("--projector", default="tensorsketch", choices=["tensorsketch", "sjlt"])
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: one GPU per rank with NCCL, peak torch.cuda.max_memory_allocated instead of RSS")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="fsdp", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="train", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from tqdm.auto import tqdm

    worlds = args.worlds or ([1, 2] if args.quick else [1, 2, 4])
    configs = [("unsharded", 1)] + [("fsdp", w) for w in worlds]
    rows = {}
    for layout, world in tqdm([(c, ph) for c in configs for ph in ("train", "featurize")], desc="runs"):
        (lay, w), phase = layout, world
        with tempfile.TemporaryDirectory() as folder:
            res = launch(args, lay, w, phase, folder)
        rows[lay, w, phase] = {
            "peak": max(r["peak_rss_mib"] for r in res), "above_import": max(r["peak_rss_mib"] - r["import_rss_mib"] for r in res),
            "seq_per_s": sum(r["sequences"] for r in res) / max(r["seconds"] for r in res), "params": res[0]["params"],
            "shard": max(r["shard_mib"] for r in res),
        }
    params = rows["unsharded", 1, "train"]["params"]
    print(f"\nGPT-2 {'(quick) ' if args.quick else ''}{params / 1e6:.1f}M parameters, float32, {args.seq_len} tokens, batch "
          f"{args.batch_size} per rank; featurize: {args.projector} m = {args.m:,} into a disk store\n")
    print("| layout | ranks | parameters held per rank (MiB) | train: peak RSS per rank (MiB) | × unsharded "
          "| featurize: peak RSS per rank (MiB) | × unsharded | train seq/s | featurize seq/s | featurize / train |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_t, base_f = rows["unsharded", 1, "train"], rows["unsharded", 1, "featurize"]
    for layout, world in configs:
        t, f = rows[layout, world, "train"], rows[layout, world, "featurize"]
        print(f"| {layout} | {world} | {t['shard']:,.0f} | {t['peak']:,.0f} ({t['above_import']:,.0f} above import) | {t['peak'] / base_t['peak']:.2f} "
              f"| {f['peak']:,.0f} ({f['above_import']:,.0f} above import) | {f['peak'] / base_f['peak']:.2f} "
              f"| {t['seq_per_s']:.2f} | {f['seq_per_s']:.2f} | {f['seq_per_s'] / t['seq_per_s']:.2f} |")


if __name__ == "__main__":
    main()

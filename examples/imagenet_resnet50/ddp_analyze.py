"""Influence of ImageNet training images on validation queries for a ResNet-50, under torchrun.

    torchrun --standalone --nnodes=1 --nproc_per_node=4 ddp_analyze.py --dataset_dir PATH_TO_IMAGENET \\
        --checkpoint resnet50.pth --query_gradient_rank 32 --factor_batch_size 512 \\
        --query_batch_size 100 --train_batch_size 256 --factor_strategy ekfac

The options and stages of ``analyze.py`` (this script runs its :func:`analyze.run`), on
``torch.distributed`` (NCCL on GPUs, one per ``LOCAL_RANK``; gloo on CPU): the model is wrapped
in DistributedDataParallel, each rank sketches a contiguous, batch-aligned shard of the train
images (``--offload disk``: ``<store>_<W>procs.rank<r>-of-<W>.h5``, joined by rank 0 into
``<store>_<W>procs.h5``), factor sums and F̂ are all-reduced, every rank scores its
shard against all queries, and rank 0 joins the score files into ``OUTPUT_DIR/scores.h5``
(same layout as ``analyze.py``), writes ``topk.json`` / ``summary.json`` and prints the
per-stage profiler tables (rank 0's, then the slowest rank's per stage). Scores equal a
one-process run's up to float rounding; the shards, true-Fisher labels and sketch do not
depend on the number of processes.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import analyze  # noqa: E402  (the single-process example beside this file)

import sketchattr.distributed as sad  # noqa: E402

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """Not started by torchrun, or no GPU for this rank."""


def build_parser() -> argparse.ArgumentParser:
    """analyze.py's options plus the process-group ones."""
    ap = analyze.build_parser()
    ap.description = __doc__.splitlines()[0]
    dist_group = ap.add_argument_group("torch.distributed")
    dist_group.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"],
                            help="process-group backend (auto: nccl when --device is CUDA, else gloo)")
    dist_group.add_argument("--dist_timeout", type=float, default=30.0, help="minutes a collective waits for the other ranks")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = analyze.check_args(ap, ap.parse_args(argv))
    if args.dist_timeout <= 0:
        ap.error(f"--dist_timeout must be > 0, got {args.dist_timeout}")
    return args


def init_distributed(args: argparse.Namespace) -> sad.Collective:
    """Join the torchrun process group; on CUDA, pin this rank to GPU ``LOCAL_RANK`` (``args.device``)."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise LaunchError(
            f"{', '.join(missing)} not set: start this script with torchrun, e.g. "
            "`torchrun --standalone --nproc_per_node=2 ddp_analyze.py ...` (one process: analyze.py)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    backend = args.backend if args.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise LaunchError("--backend nccl needs a CUDA --device")
    dist.init_process_group(backend, timeout=timedelta(minutes=args.dist_timeout))
    return sad.get_collective()


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel (on its own device); the library unwraps it."""
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    collective = init_distributed(args)
    try:
        result = analyze.run(args, collective=collective, wrap=wrap_ddp)
        # every rank done before any tears gloo down: a rank leaving while a peer's last collective is
        # still in flight aborts that peer at exit ("terminate called without an active exception")
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, LaunchError) as exc:
        sys.exit(f"error (rank {os.environ.get('RANK', '?')}): {exc}")

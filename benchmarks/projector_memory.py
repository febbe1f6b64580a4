"""Time and peak memory of sketching one huge gradient with each projector type.

Each type runs in a fresh subprocess, which creates a random input ``[batch, d]`` (float32),
then projects it to ``m`` and reports wall seconds and the peak memory *above the input*:
the growth of ``ru_maxrss`` (peak RSS) between "input created" and "projection done" (on
CUDA also the growth of ``torch.cuda.max_memory_allocated``).

Dense projectors draw ``m * d`` random numbers on CPU (also for CUDA inputs: generation is
on CPU for bit-identical sketches across devices), which is hours for ``d = 1e8, m = 4096``;
they run at ``--d_dense`` columns instead and the table adds the measured rate and the
time extrapolated to ``--d``.

    python benchmarks/projector_memory.py                       # d=1e8, m=4096, CPU
    python benchmarks/projector_memory.py --d 1e7 --types sjlt --c 4
    python benchmarks/projector_memory.py --quick               # d=2e6, m=1024 (dense at d=2e5), seconds

Each type runs in its own process; a progress bar (stderr) counts them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout

from tqdm.auto import tqdm  # noqa: E402

DENSE_TYPES = ("gaussian", "rademacher")


def _int(text: str) -> int:
    return int(float(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=_int, default=100_000_000, help="input dimension (one module)")
    p.add_argument("--m", type=_int, default=4096, help="sketch dimension")
    p.add_argument("--types", default="sjlt,gaussian,rademacher", help="comma-separated types")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=_int, default=1, help="rows B of the input [B, d]")
    p.add_argument("--d_dense", type=_int, default=500_000,
                   help="d used for gaussian/rademacher (CPU generation); time is extrapolated")
    p.add_argument("--c", type=_int, default=1, help="SJLT nonzeros per column")
    p.add_argument("--block_size", type=_int, default=None, help="default: the projector's")
    p.add_argument("--seed", type=_int, default=0)
    p.add_argument("--quick", action="store_true", help="d=2e6, m=1024, dense types at d=2e5 (a smoke run)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one type
    p.add_argument("--d-dense", dest="d_dense", type=_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spellings
    p.add_argument("--block-size", dest="block_size", type=_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # the workers get the same argv, so they see the same sizes
        args.d, args.m, args.d_dense = min(args.d, 2_000_000), min(args.m, 1024), min(args.d_dense, 200_000)
    return args


# --------------------------------------------------------------------------- worker side
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def block_bound_bytes(proj, batch: int, width: int) -> int:
    """Bytes of the per-step working set (float32 input).

    Dense: one drawn float32 chunk, ``block * m * 4``.  SJLT: one chunk of indices and
    signs (``chunk_cols * c * 9``) plus the torch path's ``[B, block * c]`` float32 temporary.
    """
    if proj.name == "sjlt":
        return proj.chunk_cols * proj.c * 9 + batch * width * proj.c * 4
    return width * proj.m * 4


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one projector type in this (fresh) process; returns a JSON-able row."""
    import torch

    from sketchattr.project import make_projector

    kind, device = args.worker, torch.device(args.device)
    d = args.d_dense if kind in DENSE_TYPES else args.d
    kwargs = {"c": args.c} if kind == "sjlt" else {}
    if args.block_size is not None:
        kwargs["block_size"] = args.block_size
    proj = make_projector(kind, m=args.m, seed=args.seed, **kwargs)

    x = torch.randn(args.batch, d, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gpu_base = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    rss_base = _peak_rss_mb()

    start = time.perf_counter()
    out = proj.project([x])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    width = min(proj.step_cols(args.batch), proj.chunk_cols)
    row = {
        "type": kind + (f"(c={args.c})" if kind == "sjlt" else ""),
        "d": d,
        "m": args.m,
        "block_w": width,
        "seconds": seconds,
        "peak_mb": _peak_rss_mb() - rss_base,
        "input_mb": x.numel() * x.element_size() / 2**20,
        "dense_gb": args.d * args.m * 4 / 2**30,  # fp32 [m, d] at the full d
        "bound_mb": block_bound_bytes(proj, args.batch, width) / 2**20,
        "rate": d / seconds,
        "extrapolated_s": seconds * args.d / d,
        "backend": getattr(proj, "backend_used", None) or "torch",
        "out_norm": float(out.norm()),
    }
    if device.type == "cuda":
        row["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
    return row


# --------------------------------------------------------------------------- parent side
def run_type(kind: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", kind]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    cols = [
        ("type", "{}"), ("d", "{:.3g}"), ("m", "{}"), ("block_w", "{}"), ("seconds", "{:.2f}"),
        ("peak_mb", "{:.1f}"), ("input_mb", "{:.1f}"), ("dense_gb", "{:.1f}"),
        ("bound_mb", "{:.1f}"), ("rate", "{:.3g}"), ("extrapolated_s", "{:.0f}"),
        ("backend", "{}"),
    ]
    if any("gpu_peak_mb" in r for r in rows):
        cols.append(("gpu_peak_mb", "{:.1f}"))
    headers = {
        "block_w": "block width", "peak_mb": "peak MB above input", "input_mb": "input MB",
        "dense_gb": "dense P avoided GB", "bound_mb": "block bound MB", "rate": "cols/s",
        "extrapolated_s": "s at full d", "gpu_peak_mb": "GPU peak MB",
    }
    table = [[headers.get(c, c) for c, _ in cols]]
    table += [[fmt.format(r.get(c, "")) for c, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    print(f"d={args.d:.3g} m={args.m} batch={args.batch} device={args.device} "
          f"(gaussian/rademacher at d={args.d_dense:.3g}, extrapolated to d)", flush=True)
    rows = []
    for kind in tqdm(kinds, desc="projector types", unit="type"):
        rows.append(run_type(kind, argv))
        tqdm.write(f"  {kind}: {rows[-1]['seconds']:.2f}s")
    print(format_table(rows))


if __name__ == "__main__":
    main()

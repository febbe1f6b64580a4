"""The ``sketchattr`` command."""
from __future__ import annotations

import argparse
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sketchattr", description="Training-data attribution with sketched influence.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train digits-mlp on bundled data and print top proponents/opponents")
    demo.add_argument("--m", type=int, default=1024, help="sketch size (default 1024)")
    demo.add_argument("--projector", default="sjlt", choices=["sjlt", "gaussian", "rademacher", "identity"])
    demo.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2], help="query positions to print")
    demo.add_argument("--k", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0, help="projector seed")
    from sketchattr.tracin_cli import add_parser as add_tracin_parser

    add_tracin_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from sketchattr.demo import run_demo

        run_demo(m=args.m, projector=args.projector, queries=tuple(args.queries), k=args.k, seed=args.seed)
    elif args.command == "tracin":
        from sketchattr.tracin_cli import run as run_tracin

        run_tracin(args)
    return 0

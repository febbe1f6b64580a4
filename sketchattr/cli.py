"""The ``sketchattr`` command: wires the subcommands' parsers (the commands live in
:mod:`sketchattr.commands`, :mod:`sketchattr.demo` and :mod:`sketchattr.tracin_cli`).

    sketchattr build     model + training file -> resumable HDF5 store + run spec
    sketchattr score     (alias: query) top-k proponents/opponents of query rows -> JSON, CSV, HTML/PNG report
    sketchattr select    LESS-style top fraction of the training rows for a target set -> .npy/.txt indices
    sketchattr validate  LDS of a score file against retraining ground truth
    sketchattr demo      the bundled digits example;  sketchattr tracin  TracIn over checkpoints

A user mistake (missing file, bad value, mismatched store) prints one ``error:`` line and exits
with status 2; ``--traceback`` (before the subcommand) shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

NEW_COMMANDS = {
    "build": ("sketchattr.commands.build", "sketch the training gradients of your model into a resumable HDF5 store", []),
    "score": ("sketchattr.commands.score", "top-k proponents/opponents of query rows -> JSON, CSV, HTML/PNG report", ["query"]),
    "select": ("sketchattr.commands.select", "LESS-style selection of the top training rows for a target set -> index file", []),
    "validate": ("sketchattr.commands.validate", "LDS of a score file against retraining ground truth", []),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="sketchattr", description="Training-data attribution with sketched influence.")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train digits-mlp on bundled data and print top proponents/opponents")
    demo.add_argument("--m", type=int, default=1024, help="sketch size (default 1024)")
    demo.add_argument("--projector", default="sjlt", choices=["sjlt", "gaussian", "rademacher", "identity"])
    demo.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2], help="query positions to print")
    demo.add_argument("--k", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0, help="projector seed")
    demo.set_defaults(run=_run_demo, command_name="demo")
    for name, (module, help_text, aliases) in NEW_COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, aliases=aliases, help=help_text, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run, command_name=name)
    from sketchattr.tracin_cli import add_parser as add_tracin_parser, run as run_tracin

    add_tracin_parser(sub).set_defaults(run=run_tracin, command_name="tracin")
    return parser


def _run_demo(args: Any) -> None:
    from sketchattr.demo import run_demo

    run_demo(m=args.m, projector=args.projector, queries=tuple(args.queries), k=args.k, seed=args.seed)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user mistake with a clear message of their own."""
    from sketchattr.commands.config import CommandError
    from sketchattr.store import StoreCorruptedError, StoreLockedError, StoreMismatchError, StoreWriteError

    return (CommandError, StoreMismatchError, StoreLockedError, StoreCorruptedError, StoreWriteError, FileNotFoundError,
            ValueError, TypeError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = _user_errors()
    try:
        if getattr(args, "config", None):
            from sketchattr.commands.config import apply_config

            args = apply_config(parser, args.command, argv, args.config)
        args.run(args)
    except errors as exc:
        if args.traceback:
            raise
        print(f"sketchattr {args.command_name}: error: {_message(exc)}", file=sys.stderr)
        return 2
    return 0


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    name = type(exc).__name__
    return text if name in ("CommandError", "DataError") else f"{text} ({name})"

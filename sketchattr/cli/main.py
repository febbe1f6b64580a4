"""The ``sketchattr`` command: wires the subcommands of :mod:`sketchattr.cli.commands` into one parser.

    sketchattr build     model + training file -> resumable HDF5 store + run spec
    sketchattr score     (alias: query) top-k proponents/opponents of query rows -> JSON, CSV, HTML/PNG report
    sketchattr select    LESS-style top fraction of the training rows for a target set -> .npy/.txt indices
    sketchattr validate  LDS of a score file against retraining ground truth
    sketchattr demo      the bundled digits example;  sketchattr tracin  TracIn over checkpoints

A user mistake (missing file, bad value, mismatched store) prints one ``error:`` line, in
command-line terms (``--overwrite``, not the library's ``overwrite=True``), and exits with status
2; ``--traceback`` (anywhere on the command line) shows the full traceback instead. An unknown
flag is refused with the nearest one the subcommand takes.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Any, Sequence

from sketchattr.cli.config import CommandError, apply_config, nearest, subparsers
from sketchattr.store import StoreCorruptedError, StoreLockedError, StoreMismatchError, StoreWriteError

COMMANDS = ("build", "score", "select", "validate", "tracin", "demo")
"""The subcommands, each a module of :mod:`sketchattr.cli.commands` with ``HELP`` (one line),
``add_arguments(parser)``, ``run(args)`` and optionally ``ALIASES``, ``DESCRIPTION`` (default: the
module docstring) and ``EPILOG``. Imported when the parser is built (``sketchattr --help`` lists
them all)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``sketchattr`` parser: every subcommand of :data:`COMMANDS`, ``--traceback`` on each."""
    parser = argparse.ArgumentParser(prog="sketchattr", description="Training-data attribution with sketched influence.")
    add_traceback_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = importlib.import_module(f"sketchattr.cli.commands.{name}")
        p = sub.add_parser(name, aliases=getattr(mod, "ALIASES", []), help=mod.HELP,
                           description=getattr(mod, "DESCRIPTION", mod.__doc__), epilog=getattr(mod, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        add_traceback_argument(p)
        p.set_defaults(run=mod.run, command_name=name)
    return parser


def add_traceback_argument(p: argparse.ArgumentParser) -> None:
    """``--traceback`` on the main parser and every subcommand, so it works before or after the
    subcommand (unset unless given: a subcommand's default never hides the main parser's value)."""
    p.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks instead of one-line errors")


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (or an alias)."""
    return subparsers(parser)[name]


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; an unknown flag exits (status 2) naming the subcommand's nearest flag."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = subcommand_parser(parser, args.command)
        flag = next((a for a in extra if a.startswith("-")), extra[0])
        near = nearest(flag.split("=", 1)[0], [o for a in sub._actions for o in a.option_strings if o.startswith("--")])
        sub.error(f"unrecognized argument {flag}" + (f"; did you mean {near}?" if near else
                  f" (`sketchattr {args.command} --help` lists the flags)"))
    return args


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user mistake with a clear message of their own."""
    return (CommandError, StoreMismatchError, StoreLockedError, StoreCorruptedError, StoreWriteError, FileNotFoundError,
            ValueError, TypeError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse(parser, argv)
    errors = _user_errors()
    try:
        if getattr(args, "config", None):

            args = apply_config(parser, args.command, argv, args.config)
        args.run(args)
    except errors as exc:
        if getattr(args, "traceback", False):
            raise
        flags = {a.dest for a in subcommand_parser(parser, args.command)._actions if a.option_strings}
        print(f"sketchattr {args.command_name}: error: {as_flags(_message(exc), flags)}", file=sys.stderr)
        return 2
    return 0


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    name = type(exc).__name__
    return text if name in ("CommandError", "DataError") else f"{text} ({name})"


KEYWORD = re.compile(r"(?<![-\w])([A-Za-z_]\w*)=(True|False|'[^']*'|\"[^\"]*\")")
"""A Python keyword argument in a library message: ``overwrite=True``, ``storage_dtype='float16'``."""


def as_flags(text: str, flags: set[str]) -> str:
    """A library message in command-line terms: ``name=True`` -> ``--name``, ``name=False`` ->
    ``no --name``, ``name='x'`` -> ``--name x``, for the names the subcommand takes as flags."""
    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if name not in flags:
            return match.group(0)
        if value in ("True", "False"):
            return f"--{name}" if value == "True" else f"no --{name}"
        return f"--{name} {value[1:-1]}"

    return KEYWORD.sub(flag, text)

"""The ``sketchattr`` subcommands for attributing a user's own model on their own files.

``build`` (store + run spec), ``score`` / ``query`` (top-k, report), ``select`` (LESS-style
index file) and ``validate`` (LDS of a score file). Each module has ``add_arguments(parser)``
and ``run(args) -> dict`` (what it wrote); :mod:`sketchattr.cli` wires them into subparsers.
"""
from sketchattr.commands.config import CommandError

__all__ = ["CommandError"]

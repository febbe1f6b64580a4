"""The ``sketchattr`` command line: attribute your own model on your own files without writing Python.

:func:`main` (:mod:`sketchattr.cli.main`) parses the command line and runs one subcommand of
:mod:`sketchattr.cli.commands` — ``build``, ``score`` (``query``), ``select``, ``validate``,
``tracin``, ``demo`` — reporting a user's mistake as one ``error:`` line. The rest of this package
is what the commands share: the run spec beside a store (:mod:`.spec`), model loading
(:mod:`.model_loading`), YAML/TOML config files (:mod:`.config`), the label mapping
(:mod:`.labels`), data-vs-model checks (:mod:`.fit_checks`) and HTML/PNG reports (:mod:`.report`).

The top of the stack with :mod:`sketchattr.bench`: may import every stage; no stage imports it.
"""
from sketchattr.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

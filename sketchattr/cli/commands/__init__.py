"""The ``sketchattr`` subcommands, one module each (listed in :data:`sketchattr.cli.main.COMMANDS`).

``build`` (store + run spec), ``score`` / ``query`` (top-k, report), ``select`` (LESS-style index
file), ``validate`` (LDS of a score file), ``tracin`` (TracIn over checkpoint files) and ``demo``
(the bundled digits example). Each has ``HELP``, ``add_arguments(parser)`` and ``run(args)``.

May import anything of sketchattr (the top of the stack, with :mod:`sketchattr.bench`).
"""

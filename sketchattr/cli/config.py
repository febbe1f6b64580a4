"""Options shared by the subcommands: ``--config FILE`` merging, required flags, the device.

A config file (YAML with pyyaml installed, TOML, or JSON) maps flag names without the dashes to
values (``store: out/store.h5``, ``m: 1024``, ``modules: [linear]``). Explicit flags win over
the file. A top-level table named after a subcommand (``[build]``, ``score:``) applies to that
command only, so one file can drive a whole pipeline; other commands' tables are ignored.
"""
from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any, Iterable

import torch

COMMANDS = ("build", "score", "query", "select", "validate")


class CommandError(Exception):
    """A user mistake (missing file, bad flag value, ...): printed as one line, no traceback."""


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (every subcommand)."""
    parser.add_argument("--config", default=None, help="YAML/TOML/JSON file whose keys are flag names (flags given here win)")


def load_config(path: str) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"config file not found: {p}")
    ext = p.suffix.lower()
    text = p.read_text()
    try:
        if ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise CommandError(f"reading {p} needs pyyaml (pip install pyyaml), or write the config as TOML") from exc
            data = yaml.safe_load(text)
        elif ext == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif ext == ".json":
            data = json.loads(text)
        else:
            raise CommandError(f"config file {p}: unknown extension {ext!r} (use .yaml, .yml, .toml or .json)")
    except CommandError:
        raise
    except Exception as exc:  # noqa: BLE001 - a parse error of the user's file, named
        raise CommandError(f"config file {p} cannot be parsed: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CommandError(f"config file {p} must hold a mapping of flag names to values, found {type(data).__name__}")
    return data


def _section(config: dict[str, Any], command: str) -> tuple[dict[str, Any], set[str]]:
    """(top-level keys plus the table named after ``command``, the keys of that table); other
    commands' tables are dropped."""
    names = {"score", "query"} if command in ("score", "query") else {command}
    norm = lambda d: {str(k).lstrip("-").replace("-", "_"): v for k, v in d.items()}
    merged = norm({k: v for k, v in config.items() if k not in COMMANDS})
    own: set[str] = set()
    for name in names:
        table = config.get(name)
        if table is not None:
            if not isinstance(table, dict):
                raise CommandError(f"config table {name!r} must be a mapping of flag names to values")
            merged.update(norm(table))
            own.update(norm(table))
    return merged, own


def _convert(action: argparse.Action, value: Any, source: str) -> Any:
    """A config value as argparse would have produced it from the command line."""
    flag = action.option_strings[0]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CommandError(f"{source}: {flag} takes true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not many and len(values) != 1:
        raise CommandError(f"{source}: {flag} takes one value, got {value!r}")
    out = []
    for v in values:
        if action.type is not None and not isinstance(v, (dict, list)):
            try:
                v = action.type(str(v) if not isinstance(v, (int, float)) or action.type is str else v)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise CommandError(f"{source}: {flag} = {v!r}: {exc}") from exc
        if action.choices is not None and v not in action.choices:
            raise CommandError(f"{source}: {flag} = {v!r} is not one of {list(action.choices)}")
        out.append(v)
    return out if many else out[0]


def apply_config(parser: argparse.ArgumentParser, command: str, argv: list[str], config_path: str) -> argparse.Namespace:
    """Re-parse ``argv`` with the config file's values as the subcommand's defaults. A top-level
    key another subcommand takes (a pipeline file shared by build and score) is skipped; a key no
    subcommand takes, or one in this command's own table that it does not take, is an error."""
    config, own = _section(load_config(config_path), command)
    subs = subparsers(parser)
    dests = lambda p: {a.dest: a for a in p._actions if a.option_strings and a.dest not in ("config", "help")}
    actions = dests(subs[command])
    others = {d for name, p in subs.items() if name in COMMANDS for d in dests(p)}
    unknown = sorted(k for k in config if k not in actions and (k in own or k not in others))
    if unknown:
        near = [f"{k} -> {n}" for k in unknown if (n := nearest(k, actions)) is not None]
        raise CommandError(f"config file {config_path}: unknown key(s) {unknown} for `sketchattr {command}`"
                           + (f"; did you mean {', '.join(near)}?" if near else f" (flags: {', '.join(sorted(actions))})"))
    defaults = {k: _convert(actions[k], v, f"config file {config_path}") for k, v in config.items() if k in actions}
    subs[command].set_defaults(**defaults)
    return parser.parse_args(argv)


def nearest(name: str, options: Iterable[str]) -> str | None:
    """The option closest to a mistyped ``name`` (difflib), or None when none is close."""
    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{subcommand name or alias: its parser}."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise ValueError("the parser has no subcommands")


def require(args: argparse.Namespace, names: Iterable[str], command: str) -> None:
    """Fail naming every required flag that neither the command line nor the config gave."""
    missing = [f"--{n}" for n in names if getattr(args, n, None) in (None, "", [])]
    if missing:
        raise CommandError(f"`sketchattr {command}` needs {', '.join(missing)} (on the command line or in --config)")


def resolve_device(name: str | None) -> torch.device:
    """``--device``: as given, or cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CommandError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name} asked for, but torch sees no CUDA device here")
    return device


def parse_kwargs(text: "str | dict[str, Any] | None", flag: str) -> dict[str, Any]:
    """``--model_args``: a JSON object (``'{"hidden": 32}'``), ``key=value,key=value`` pairs
    (values read as JSON when they parse, else strings), or a mapping from a config file."""
    if text in (None, ""):
        return {}
    if isinstance(text, dict):
        return dict(text)
    text = str(text).strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{flag} is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise CommandError(f"{flag} must be a JSON object of keyword arguments")
        return value
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, raw = part.partition("=")
        if not eq or not key.strip():
            raise CommandError(f"{flag}: {part!r} is not key=value (give a JSON object or key=value,key=value)")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--batch_size``, ``--no_progress`` (every command that runs the model)."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=None, help="examples per forward + backward (default 64, or the run spec's)")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")

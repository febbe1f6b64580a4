"""The user's model from ``--model``: ``module:function`` (plus ``--model_args``, ``--checkpoint``)
or a local Hugging Face folder (``AutoModelFor...`` by ``--task``; never downloads).

``module`` is an import path (the current folder is importable; a run spec records the folder
it was imported from, :func:`model_origin`, so later commands import it from anywhere) or a
``.py`` file (``models/net.py:make_net``); the function returns an ``nn.Module``. A checkpoint is a state
dict saved with ``torch.save(model.state_dict(), path)`` (or a dict holding one under
``state_dict`` / ``model_state_dict`` / ``model``), read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sketchattr.cli.config import CommandError

HF_AUTO = {
    "classification": "AutoModelForSequenceClassification",
    "sequence_classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
}


def is_hf_folder(model: str) -> bool:
    """Whether ``--model`` names a local folder (then it must be a Hugging Face model folder)."""
    return Path(model).is_dir()


def load_function(spec: str, flag: str = "--model", search_path: str | None = None) -> Callable[..., Any]:
    """The callable named by ``module:function`` or ``path/file.py:function`` (``flag`` names the
    option in error messages); ``search_path``: the folder an import path is looked up in first
    (the one recorded at build)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise CommandError(f"{flag} {spec!r} is neither 'module:function' nor an existing Hugging Face model folder")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise CommandError(f"{flag} {spec}: file {path} not found")
            name = f"_sketchattr_user_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` would: models next to the user's files import
            if search_path and search_path not in sys.path:
                sys.path.insert(0, search_path)
            module = importlib.import_module(mod_name)
    except CommandError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import: name it and why
        where = f" (looked in {search_path}, recorded at build, and on sys.path)" if search_path else ""
        raise CommandError(f"{flag} {spec}: cannot import {mod_name!r}{where}: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"{flag} {spec}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CommandError(f"{flag} {spec}: {attr!r} is not callable")
    return obj


def model_origin(model: str) -> tuple[str | None, str | None]:
    """(the file holding ``--model``'s code, the sys.path folder its import path resolves from)
    of a model already loaded: ``(None, None)`` for a Hugging Face folder; a ``.py`` file has no
    import folder."""
    mod_name = model.partition(":")[0]
    if is_hf_folder(model) or not mod_name:
        return None, None
    if mod_name.endswith(".py"):
        return str(Path(mod_name).resolve()), None
    module = sys.modules.get(mod_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None, None
    path = Path(file).resolve()
    package = path.parent if path.name == "__init__.py" else path  # a.b -> .../a/b(.py): the folder above a
    return str(path), str(package.parents[len(mod_name.split(".")) - 1])


def load_model(model: str, model_args: dict[str, Any], checkpoint: str | None, task: str,
               init_seed: int | None = None, search_path: str | None = None) -> nn.Module:
    """The model in eval mode on the CPU (moved to the device by the caller). ``init_seed``: the
    torch seed the function builds its (random) weights under; ``search_path``: see :func:`load_function`."""
    if is_hf_folder(model):
        if checkpoint:
            raise CommandError("--checkpoint is for module:function models; a Hugging Face folder holds its own weights")
        return load_hf_model(model, model_args, task)
    fn = load_function(model, search_path=search_path)
    try:
        net = _call_seeded(fn, model_args, init_seed)
    except TypeError as exc:
        raise CommandError(f"--model {model} with --model_args {model_args}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise CommandError(f"--model {model} returned {type(net).__name__}, not a torch.nn.Module")
    if checkpoint:
        net.load_state_dict(read_state_dict(checkpoint, net))
    return net.eval()


def _call_seeded(fn: Callable[..., Any], kwargs: dict[str, Any], seed: int | None) -> Any:
    """``fn(**kwargs)``, under ``torch.manual_seed(seed)`` (global RNG state restored after) when seeded."""
    if seed is None:
        return fn(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(**kwargs)


def read_state_dict(path: str, model: nn.Module, flag: str = "--checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (weights_only), checked against the model's keys and shapes."""
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"{flag} not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused or damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # an empty file raises with no message
        raise CommandError(f"cannot read {flag} {p} with torch.load(weights_only=True): {first}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CommandError(f"{flag} {p} is not a state dict (torch.save(model.state_dict(), path))")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {missing[:8]}"] if missing else []) + ([f"unexpected keys {unexpected[:8]}"] if unexpected else [])
        parts += [f"shape mismatch {s}" for s in shapes[:8]]
        raise CommandError(f"{flag} {p} does not fit the model: " + "; ".join(parts))
    return state


def load_hf_model(folder: str, model_args: dict[str, Any], task: str) -> nn.Module:
    """``AutoModelFor<task>.from_pretrained(folder, local_files_only=True)``, offline."""
    p = Path(folder)
    if not (p / "config.json").is_file():
        raise CommandError(f"--model folder {p} has no config.json: not a Hugging Face model folder (save_pretrained)")
    transformers = _transformers()
    auto = getattr(transformers, HF_AUTO[task])
    try:
        return auto.from_pretrained(str(p), local_files_only=True, **model_args).eval()
    except Exception as exc:  # noqa: BLE001 - config/weights the auto class cannot load, named
        raise CommandError(f"cannot load {p} as {HF_AUTO[task]} (--task {task}): {type(exc).__name__}: {exc}") from exc


def load_tokenizer(tokenizer: str | None, model: str) -> Any:
    """The tokenizer of ``--tokenizer DIR``, else of a Hugging Face model folder when it has one, else None."""
    folder = tokenizer or (model if is_hf_folder(model) else None)
    if folder is None:
        return None
    p = Path(folder)
    if not p.is_dir():
        raise CommandError(f"--tokenizer folder not found: {p}")
    has = any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json"))
    if not has:
        if tokenizer:
            raise CommandError(f"--tokenizer {p} holds no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.*)")
        return None
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CommandError(f"cannot load a tokenizer from {p}: {type(exc).__name__}: {exc}") from exc


def _transformers() -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"  # local folders only (with local_files_only=True): never reach the network
    try:
        import transformers
    except ImportError as exc:
        raise CommandError("Hugging Face model folders need transformers: pip install 'sketchattr[hf]'") from exc
    return transformers

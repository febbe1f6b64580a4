"""Module selection: which layers' parameters we attribute through.

A *supported* module is one that owns trainable parameters directly (``Linear``, ``Conv2d``,
``LayerNorm``, ``Embedding``, custom modules with their own ``nn.Parameter`` s, ...). Every
selected module becomes one gradient block with its own projector stream.

Tied parameters (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) belong to the first
module that registers them and are counted once; the other modules that use them are listed in
``ModuleSelection.tied`` and the block's gradient sums every use. Naming a module whose
parameters all belong to an earlier one (``lm_head``) selects that owner.
"""
from __future__ import annotations

import abc
import fnmatch
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from sketchattr.featurize.rules import rule_for


@dataclass(frozen=True)
class ModuleSelection:
    """Selected modules in attribution order, with their parameter names and sizes.

    ``param_names[k]`` are the full parameter names (``"0.weight"``) of module ``names[k]``;
    ``dims[k]`` is the number of scalar parameters of module k.
    """
    names: tuple[str, ...]
    param_names: tuple[tuple[str, ...], ...]
    dims: tuple[int, ...]
    tied: tuple[tuple[str, ...], ...] = ()
    """``tied[k]``: the other modules that use module k's parameters (tied weights)."""
    @property
    def total(self) -> int:
        """Total number of attributed parameters d."""
        return int(sum(self.dims))

    def parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Selected parameters of ``model`` by full name, in selection order."""
        named = dict(model.named_parameters())
        return {p: named[p] for group in self.param_names for p in group}

    def summary(self) -> str:
        """A small table of module names and parameter counts."""
        width = max([len(n) for n in self.names] + [6])
        lines = [f"{'module':<{width}}  params"]
        tied = self.tied or ((),) * len(self.names)
        lines += [f"{n:<{width}}  {d:,}" + (f"  (tied: {', '.join(t)})" if t else "") for n, d, t in zip(self.names, self.dims, tied)]
        lines.append(f"{'total':<{width}}  {self.total:,}")
        return "\n".join(lines)

    def spec(self) -> dict[str, Any]:
        """JSON-able description for store metadata."""
        return {"names": list(self.names), "dims": list(self.dims)}


WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside (Distributed)DataParallel wrappers (through the public
    ``.module``); any other model is returned as is. Names, fingerprints and hooks refer to it,
    so a model wrapped before or after creating a featurizer gives the same stores."""
    while isinstance(model, WRAPPERS):
        model = model.module
    return model


def _unprefixed(name: str, available: dict[str, nn.Module]) -> str:
    """``name`` as given, or without the ``module.`` prefix a DDP wrapper adds when only the
    unprefixed name exists (so names copied from a wrapped model work)."""
    if name in available or not name.startswith("module."):
        return name
    return name[len("module."):] if name[len("module."):] in available else name


def own_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{module name: [(local name, parameter)]}: each trainable parameter under the first module
    (registration order) that holds it directly, so a tied parameter appears once."""
    seen: set[int] = set()
    owned: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                owned.setdefault(name, []).append((local, p))
    return owned


def parameter_users(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): names of every module holding it directly}, registration order."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            users.setdefault(id(p), []).append(name)
    return users


def supported_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own trainable parameters directly, in registration order (a tied
    parameter's owner is the first module holding it)."""
    modules = dict(model.named_modules())
    return {name: modules[name] for name in own_parameters(model)}


def _short(available: dict[str, nn.Module], limit: int = 12) -> str:
    names = list(available)
    return str(names) if len(names) <= limit else f"{names[:limit]} and {len(names) - limit} more"


def _owner(name: str, model: nn.Module, available: dict[str, nn.Module]) -> str:
    """``name``, or the module owning its parameters when they are all tied to another's."""
    if name in available:
        return name
    module = dict(model.named_modules()).get(name)
    if module is None:
        return name
    params = [p for p in module.parameters(recurse=False) if p.requires_grad]
    owners = {n for n, m in available.items() if any(q is p for p in params for q in m.parameters(recurse=False))}
    return owners.pop() if len(owners) == 1 else name


KINDS: dict[str, tuple[str, ...]] = {
    "linear": ("linear", "hf_conv1d"),
    "conv": ("conv",),
    "embedding": ("embedding",),
    "norm": ("elementwise_norm", "channel_norm"),
}
"""Kind keywords of ``select_modules`` -> the layer rules they stand for (plus ``"lora"``)."""


class Selector(abc.ABC):
    """A selection that needs the model to resolve (the last blocks, modules of given types):
    ``resolve(model, available) -> names`` among ``available`` (supported modules by name)."""
    @abc.abstractmethod
    def resolve(self, model: nn.Module, available: dict[str, nn.Module]) -> list[str]:
        """The selected names, in registration order unless the selector says otherwise."""


@dataclass(frozen=True)
class ModuleTypes(Selector):
    """Every leaf module that is an instance of one of ``types`` and owns trainable parameters
    (``ModuleTypes((nn.Linear, nn.Conv2d))`` is what Kronfluence tracks by default)."""
    types: tuple[type, ...]

    def __repr__(self) -> str:
        return f"ModuleTypes({', '.join(t.__name__ for t in self.types)})"

    def resolve(self, model: nn.Module, available: dict[str, nn.Module]) -> list[str]:
        chosen = [n for n, m in available.items() if isinstance(m, self.types) and not any(True for _ in m.children())]
        if not chosen:
            kinds = ", ".join(t.__name__ for t in self.types)
            raise ValueError(f"the model has no leaf module of type {kinds} with trainable parameters; available: {_short(available)}")
        return chosen


@dataclass(frozen=True)
class LastBlocks(Selector):
    """The last ``n`` blocks of the model's block list (the ``nn.ModuleList`` holding the most
    parameters: ``model.layers``, ``transformer.h``, ``encoder.layer`` …), optionally only the
    modules inside them whose names match one of ``patterns`` (globs, e.g. ``"*.mlp.*"``)."""
    n: int
    patterns: tuple[str, ...] = ()

    def resolve(self, model: nn.Module, available: dict[str, nn.Module]) -> list[str]:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError("last_blocks: the model has no nn.ModuleList of blocks")
        name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
        if not 1 <= self.n <= len(blocks):
            raise ValueError(f"last_blocks({self.n}): {name or '<root>'} has {len(blocks)} blocks")
        prefixes = [f"{name}.{i}" if name else str(i) for i in range(len(blocks) - self.n, len(blocks))]
        chosen = [a for a in available if any(a == p or a.startswith(p + ".") for p in prefixes)]
        if self.patterns:
            chosen = [a for a in chosen if any(fnmatch.fnmatchcase(a, pat) for pat in self.patterns)]
        if not chosen:
            raise ValueError(f"last_blocks({self.n}, {list(self.patterns)}) selects no module with trainable parameters "
                             f"under {prefixes}")
        return chosen


def last_blocks(n: int, *patterns: str) -> LastBlocks:
    """Select the modules of the last ``n`` transformer blocks (see :class:`LastBlocks`):
    ``last_blocks(2)``, or ``last_blocks(2, "*.mlp.*")`` for the MLPs of the last two."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"last_blocks needs an int n >= 1, got {n!r}")
    return LastBlocks(n, tuple(patterns))


def _kind_of(module: nn.Module) -> str | None:

    rule = rule_for(module)
    return None if rule is None else rule.name


def _is_lora(name: str, module: nn.Module) -> bool:
    """A PEFT LoRA module: a ``lora_*`` path segment (``…q_proj.lora_A.default``) or ``lora_*`` parameters."""
    return any(seg.startswith("lora_") for seg in name.split(".")) or any(
        pn.startswith("lora_") for pn, _ in module.named_parameters(recurse=False))


def _matches(item: str, model: nn.Module, available: dict[str, nn.Module]) -> list[str]:
    """The available modules one selection string stands for: a kind keyword, a glob pattern
    or (returned as is, checked later) a module name."""
    if item in available:
        return [item]
    if item == "lora":
        return [n for n, m in available.items() if _is_lora(n, m)]
    if item in KINDS:
        return [n for n, m in available.items() if _kind_of(m) in KINDS[item]]
    if any(ch in item for ch in "*?["):
        return [n for n in available if fnmatch.fnmatchcase(n, item)]
    return [_owner(_unprefixed(item, available), model, available)]


def forward_order(model: nn.Module, example_input: Any, names: Sequence[str]) -> list[str]:
    """Order ``names`` by when their modules first run in a forward pass on ``example_input``
    (a callable ``run(model)``, a dict of keyword inputs, or the model's positional input)."""
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = []
    for name in names:
        def hook(_m, _i, _o, name=name):
            if name not in order:
                order.append(name)
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            if callable(example_input) and not isinstance(example_input, nn.Module):
                example_input(model)
            elif isinstance(example_input, dict):
                model(**example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]  # modules not run keep registration order


def select_modules(
    model: nn.Module, which: Any = None, example_input: Any = None
) -> ModuleSelection:
    """Select modules to attribute through.

    which:

    * ``None`` or ``"all"`` — every supported module;
    * an int N — the last N supported modules in forward order (traced on ``example_input``,
      a callable ``run(model)``, a dict of keyword inputs or a positional input; registration
      order without one);
    * a kind: ``"linear"`` (nn.Linear and transformers' Conv1D), ``"conv"``, ``"embedding"``,
      ``"norm"``, or ``"lora"`` (the ``lora_A``/``lora_B`` modules of a PEFT model; frozen
      base weights are never selected);
    * a glob pattern over module names, e.g. ``"*.mlp.*"``;
    * :func:`last_blocks` ``(n, *patterns)`` — the modules of the last n transformer blocks;
      :class:`ModuleTypes` ``(types)`` — the leaf modules of these types (any :class:`Selector`);
    * a module name (names of a DistributedDataParallel-wrapped model, ``module.`` prefix
      included, work too; a module whose parameters are tied to another's selects that owner);
    * a sequence of any of these: their union, in the order given (registration order within a
      kind or pattern).
    """
    model = unwrap_model(model)
    available = supported_modules(model)
    if not available:
        raise ValueError("the model has no trainable parameters to attribute through")
    if which is None or (isinstance(which, str) and which == "all"):
        names = list(available)
    elif isinstance(which, int) and not isinstance(which, bool):
        if not 1 <= which <= len(available):
            raise ValueError(
                f"last-N needs 1 <= N <= {len(available)} (supported modules: {list(available)}), got {which}"
            )
        ordered = forward_order(model, example_input, list(available)) if example_input is not None else list(available)
        names = ordered[-which:]
    else:
        if isinstance(which, bool) or not isinstance(which, (str, Selector, list, tuple)):
            raise TypeError(
                f"modules must be None/'all', an int N (last N), a kind, a glob pattern, a module name, "
                f"last_blocks(...), or a list/tuple of those; got {type(which).__name__} {which!r}"
            )
        items = [which] if isinstance(which, (str, Selector)) else list(which)
        if not items:
            raise ValueError("modules is an empty list: name at least one module, kind or pattern, or pass None for all")
        names, explicit = [], []
        for item in items:
            if isinstance(item, Selector):
                found = item.resolve(model, available)
            elif isinstance(item, str):
                found = _matches(item, model, available)
                if not found or (len(found) == 1 and found[0] not in available):
                    kinds = ", ".join(["all", "lora", *KINDS])
                    if item in KINDS or item == "lora" or any(ch in item for ch in "*?["):
                        raise ValueError(f"module selection {item!r} matches no module with trainable parameters; "
                                         f"available: {_short(available)}")
                    raise ValueError(f"unknown module name(s) {[item]}; use a name, a glob pattern, a kind ({kinds}) "
                                     f"or an int N; available: {_short(available)}")
                if item in available or not (item in KINDS or item == "lora" or any(ch in item for ch in "*?[")):
                    explicit.extend(found)
            else:
                raise ValueError(f"unknown module selection {item!r}: use 'all', an int N, a kind, a pattern, a name, "
                                 "last_blocks(n) or a list of these")
            names.extend(found)
        if len(set(explicit)) != len(explicit):
            given = [i if isinstance(i, str) else repr(i) for i in items]
            raise ValueError(f"module names repeated in {given}" + (f" (tied modules resolve to their owners: {explicit})" if set(given) != set(explicit) else ""))
        names = list(dict.fromkeys(names))
    owned, users = own_parameters(model), parameter_users(model)
    param_names, dims, tied = [], [], []
    for name in names:
        own = owned[name]
        prefix = f"{name}." if name else ""
        param_names.append(tuple(prefix + pn for pn, _ in own))
        dims.append(sum(p.numel() for _, p in own))
        tied.append(tuple(dict.fromkeys(u for _, p in own for u in users[id(p)] if u != name)))
    return ModuleSelection(tuple(names), tuple(param_names), tuple(dims), tuple(tied))

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

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn



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


def forward_order(model: nn.Module, example_input: Any, names: Sequence[str]) -> list[str]:
    """Order ``names`` by when their modules first run in a forward pass on ``example_input``."""
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
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]  # modules not run keep registration order


def select_modules(
    model: nn.Module, which: Any = None, example_input: Any = None
) -> ModuleSelection:
    """Select modules to attribute through.

    which: ``None`` or ``"all"`` — every supported module; an int N — the last N supported modules
    in forward order (traced on ``example_input`` when given, registration order otherwise);
    a sequence of names — exactly those modules, in the order given (names of a
    DistributedDataParallel-wrapped model, ``module.`` prefix included, work too).
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
    elif isinstance(which, str):
        raise ValueError(f"unknown module selection {which!r}: use 'all', an int N (last N), or a list of names")
    else:
        names = [_owner(_unprefixed(n, available), model, available) for n in which]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown module name(s) {unknown}; available: {list(available)}")
        if len(set(names)) != len(names):
            given = [_unprefixed(n, available) for n in which]
            raise ValueError(f"module names repeated in {given}" + (f" (tied modules resolve to their owners: {names})" if given != names else ""))
        if not names:
            raise ValueError("empty module list")
    owned, users = own_parameters(model), parameter_users(model)
    param_names, dims, tied = [], [], []
    for name in names:
        own = owned[name]
        prefix = f"{name}." if name else ""
        param_names.append(tuple(prefix + pn for pn, _ in own))
        dims.append(sum(p.numel() for _, p in own))
        tied.append(tuple(dict.fromkeys(u for _, p in own for u in users[id(p)] if u != name)))
    return ModuleSelection(tuple(names), tuple(param_names), tuple(dims), tuple(tied))

"""Module selection: which layers' parameters we attribute through.

A *supported* module is one that owns trainable parameters directly (``Linear``, ``Conv2d``,
``LayerNorm``, ``Embedding``, custom modules with their own ``nn.Parameter`` s, ...). Every
selected module becomes one gradient block with its own projector stream.
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
        lines += [f"{n:<{width}}  {d:,}" for n, d in zip(self.names, self.dims)]
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


def supported_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own trainable parameters directly, in registration order."""
    found = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            found[name] = module
    return found


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
        names = [_unprefixed(n, available) for n in which]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown module name(s) {unknown}; available: {list(available)}")
        if len(set(names)) != len(names):
            raise ValueError(f"module names repeated in {names}")
        if not names:
            raise ValueError("empty module list")
    param_names, dims = [], []
    for name in names:
        own = [(pn, p) for pn, p in available[name].named_parameters(recurse=False) if p.requires_grad]
        prefix = f"{name}." if name else ""
        param_names.append(tuple(prefix + pn for pn, _ in own))
        dims.append(sum(p.numel() for _, p in own))
    return ModuleSelection(tuple(names), tuple(param_names), tuple(dims))

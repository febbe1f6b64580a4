"""The hook engine's plan: the blocks of a module selection, their uses, layer rules and layouts.

Each selected module is a *block*: its own trainable parameters (a tied parameter belongs to its
first module, see :mod:`sketchattr.featurize.selection`). A block's *uses* are every module
holding one of its parameters directly (GPT-2's ``wte`` block is used by ``wte`` and
``lm_head``); each use has a :class:`~sketchattr.featurize.rules.LayerRule`. A block is
*covered* when every use has a rule; it is *Kronecker* when every use is a Kronecker rule on the
same ``[rows, cols]`` weight, and then has a :class:`KronLayout`; otherwise a ``FlatLayout``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sketchattr.featurize.rules import (
    FlatLayout,
    KroneckerRule,
    KronLayout,
    LayerRule,
    rule_for,
)
from sketchattr.featurize.selection import ModuleSelection, parameter_users

__all__ = ["Block", "Use", "plan_blocks"]


@dataclass(frozen=True)
class Use:
    """A module that holds some of a block's parameters: ``touched`` maps its local parameter
    names to their positions in the block."""

    name: str
    module: nn.Module
    rule: LayerRule | None
    touched: tuple[tuple[str, int], ...]

    @property
    def problem(self) -> str:
        """Why the hook engine cannot differentiate this use ("" if it can)."""
        if self.rule is None:
            return f"{type(self.module).__name__}: no layer rule"
        issue = self.rule.problem()
        return f"{issue}" if issue else ""


@dataclass(frozen=True)
class Block:
    """One selected module's parameters: names (full), shapes, matrix layout and uses."""

    name: str
    param_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    layout: "KronLayout | FlatLayout"
    uses: tuple[Use, ...]
    containers: tuple[str, ...] = ()
    """Modules holding the parameters without a rule, taken to only hand them on to ``uses``."""

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def covered(self) -> bool:
        return all(not u.problem for u in self.uses)

    @property
    def kronecker(self) -> bool:
        return self.layout.kronecker

    @property
    def diagonal_rows(self) -> bool:
        """Every use's row factor is one-hot (an untied Embedding): the row second moment is diagonal."""
        return self.kronecker and all(getattr(u.rule, "one_hot_rows", False) for u in self.uses)

    def describe(self) -> str:
        """``name (rule[, rule of a tied use ...])``."""
        rules = [u.rule.name if u.rule is not None else type(u.module).__name__ + "?" for u in self.uses]
        return f"{self.name or '<root>'} ({', '.join(rules)})"


def plan_blocks(model: nn.Module, selection: ModuleSelection) -> list[Block]:
    """The blocks of ``selection`` with their uses, rules and layouts."""
    named = dict(model.named_parameters())
    modules = dict(model.named_modules())
    users = parameter_users(model)
    rules: dict[str, LayerRule | None] = {}
    blocks = []
    for name, pnames in zip(selection.names, selection.param_names):
        params = [named[p] for p in pnames]
        position = {id(p): i for i, p in enumerate(params)}
        use_names = list(dict.fromkeys(u for p in params for u in users[id(p)]))
        uses = []
        for un in use_names:
            module = modules[un]
            if un not in rules:
                rules[un] = rule_for(module)
            touched = tuple((local, position[id(p)]) for local, p in module.named_parameters(recurse=False) if id(p) in position)
            uses.append(Use(un, module, rules[un], touched))
        # a holder without a rule whose parameters other (ruled) uses also hold is taken for a
        # container that only hands them on (BERT's prediction head holding its decoder's bias);
        # the first-batch check against autograd catches a container that uses them itself
        ruled = {i for u in uses if u.rule is not None for _, i in u.touched}
        containers = tuple(u.name for u in uses if u.rule is None and all(i in ruled for _, i in u.touched))
        uses = [u for u in uses if u.name not in containers]
        prefix = f"{name}." if name else ""
        locals_ = tuple(p[len(prefix):] for p in pnames)
        layout = _kron_layout(locals_, uses, name) or FlatLayout(sum(p.numel() for p in params))
        blocks.append(Block(name, tuple(pnames), tuple(tuple(p.shape) for p in params), layout, tuple(uses), containers))
    return blocks


def _kron_layout(locals_: tuple[str, ...], uses: list[Use], owner: str) -> KronLayout | None:
    """The block's KronLayout when every use is a Kronecker rule on the same weight, else None."""
    if "weight" not in locals_ or set(locals_) - {"weight", "bias"}:
        return None
    w_index = locals_.index("weight")
    base = None
    for use in uses:
        if not isinstance(use.rule, KroneckerRule) or use.problem:
            return None
        touched = dict(use.touched)
        if touched.get("weight") != w_index or set(touched) - {"weight", "bias"}:
            return None
        lay = use.rule.layout()
        if use.name == owner:
            base = lay
        if "bias" in touched and lay.bias is None:
            return None
        if base is not None and (lay.rows, lay.cols) != (base.rows, base.cols):
            return None
    if base is None:
        return None
    shapes = {(u.rule.layout().rows, u.rule.layout().cols) for u in uses}  # type: ignore[union-attr]
    if len(shapes) != 1:
        return None
    sides = {u.rule.layout().bias for u in uses if "bias" in dict(u.touched)}  # type: ignore[union-attr]
    if len(sides) > 1:
        return None
    return KronLayout(base.rows, base.cols, base.bias if "bias" in locals_ else None)

"""Name registries for swappable components (projectors, samplers, stores, scorers).

A root class derives from :class:`Registered` and declares its own ``registry`` dict and a
``kind`` word; subclasses register with ``class Gaussian(Projector, name="gaussian")``.
"""
from __future__ import annotations

from typing import Any, ClassVar


class Registered:
    """Mixin: ``class X(Root, name="x")`` records X in ``Root.registry`` and sets ``X.name``."""

    registry: ClassVar[dict[str, type]]
    kind: ClassVar[str] = "component"

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        previous = cls.registry.get(name)
        if previous is not None and previous.__qualname__ != cls.__qualname__:
            raise ValueError(f"{cls.kind} name {name!r} is already registered by {previous}")
        cls.name = name
        cls.registry[name] = cls

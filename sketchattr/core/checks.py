"""Input checks shared by the projectors, samplers and datasets (validated at the boundary)."""
from __future__ import annotations

import numbers
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; a clear ValueError otherwise (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)

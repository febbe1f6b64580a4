"""The sketch's working memory per batch, estimated before the first batch and refused above a budget."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from sketchattr.project import Projector

__all__ = ["check_sketch_memory", "physical_memory_bytes"]


def physical_memory_bytes() -> float:
    """The machine's physical memory (inf where the OS does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def check_sketch_memory(projector: Projector, dims: Sequence[int], batch_size: int, dtype: torch.dtype,
                        budget_gib: float | None) -> None:
    """Refuse a sketch whose working memory per batch (rows ``[batch_size, m]`` plus the projector's
    chunk) exceeds ``budget_gib`` (default: half the physical memory); nothing is allocated."""
    need = projector.workspace_bytes(dims, batch_size, dtype)
    budget = budget_gib * 2**30 if budget_gib is not None else physical_memory_bytes() / 2
    if need > budget:
        raise ValueError(
            f"the sketch needs about {need / 2**30:.1f} GiB per batch ({projector.spec().get('type')} with "
            f"m={projector.output_dim(dims):,}, batch_size={batch_size}, {dtype}), more than the "
            f"memory budget of {budget / 2**30:.1f} GiB: use a smaller m or batch_size, or pass memory_budget_gib="
        )

"""Identity "projector": the sketch is the full concatenated gradient (no compression)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sketchattr.project.base import DEFAULT_BLOCK_SIZE, Projector, _check_dims, _check_grads, _check_int

__all__ = ["IdentityProjector"]


class IdentityProjector(Projector, name="identity"):
    """``P = I``: ``project(grads) = torch.cat(grads, dim=1)`` (``[B, sum_k d_k]``).

    ``m`` is ignored (may be None); ``seed`` and ``block_size`` are accepted for a uniform
    constructor and unused.
    """

    def __init__(self, m: int | None = None, seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE):
        self.m = None
        self.seed = _check_int("seed", seed, minimum=0)
        self.block_size = _check_int("block_size", block_size, minimum=1)

    def output_dim(self, dims: Sequence[int]) -> int:
        return sum(_check_dims(dims))

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, sum_k d_k]``: the concatenation of the validated blocks (a new tensor)."""
        return torch.cat(_check_grads(grads), dim=1)

    def project_captured(self, capture: Any) -> torch.Tensor:
        """``[B, sum_k d_k]``: the hook engine's exact per-example gradients, written piece by piece."""
        dims = [b.dim for b in capture.blocks]
        out, offset = None, 0
        for k, d in enumerate(dims):
            for start, piece in capture.grad_pieces(k):
                if out is None:
                    out = piece.new_empty(piece.shape[0], sum(dims))
                out[:, offset + start : offset + start + piece.shape[1]] = piece
            offset += d
        return out

    def project_module(self, g: torch.Tensor, module_index: int) -> torch.Tensor:
        """The module's own columns, ``[B, d_k]`` (a copy)."""
        (g,) = _check_grads([g])
        _check_int("module_index", module_index, minimum=0)
        return g.clone()

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.eye(self.output_dim(dims), dtype=dtype)

    def spec(self) -> dict[str, Any]:
        return {"type": self.name}

    def __repr__(self) -> str:
        return "IdentityProjector()"

    def _accumulate(self, out: torch.Tensor, g: torch.Tensor, k: int) -> None:  # pragma: no cover
        raise NotImplementedError("IdentityProjector overrides project() directly")

    def _module_matrix(self, d: int, k: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError("IdentityProjector overrides matrix() directly")

"""Sparse Johnson-Lindenstrauss transform (SJLT), optionally via the ``sjlt`` CUDA kernel.

Every input coordinate ``j`` is sent to ``c`` output rows with random signs, scaled by
``1/sqrt(c)`` (the convention of the ``sjlt`` CUDA package; row collisions among the ``c``
draws are allowed and then add up)::

    P[idx[j, r], j] += signs[j, r] / sqrt(c)        for r in range(c)

Generation rule.  For module ``k`` with ``d_k`` columns, chunk ``b`` covers columns
``[b * W, min(d_k, (b + 1) * W))`` with ``W = chunk_cols = 2**16`` and width
``w = min(W, d_k - b * W)``.  With
``gen = torch.Generator(device="cpu").manual_seed(block_seed(seed, k, b))``, in this order::

    idx   = torch.randint(0, m, (w, c), generator=gen)                       # int64
    signs = (torch.randint(0, 2, (w, c), generator=gen) * 2 - 1).to(torch.int8)

drawn on CPU (identical on every device) and moved to the input's device.  Compute steps
are slices of a chunk with at most ``block_size`` columns.

The torch path folds each sign into the row index (``idx + m`` for a negative sign) and
accumulates with ``index_add_`` into a ``[B, 2m]`` buffer, ``out = (buf[:, :m] − buf[:, m:]) /
sqrt(c)`` at the end: no temporary of the input's size is ever made (the multiply by the
signs was the slow part on CPU: a fresh ``[B, d]`` tensor per step).

Backends: on CUDA, for float32/float64 inputs, if ``from sjlt._C import
sjlt_projection_cuda`` works, each step calls the kernel ("sjlt-cuda"); otherwise a torch
``index_add_`` implementation runs ("torch").  Both use atomics (unordered sums) on CUDA, so
CUDA results match the CPU ones up to floating-point rounding, not bitwise.  The kernel
scales by a float32 ``1/sqrt(c)`` even for float64 inputs (relative error ~1e-8 when ``c`` is
not a power of 4).  Measured on an H100 (sjlt 0.1.7), the torch path was as fast or faster
(e.g. B=1000, d=1e4, m=1024: 0.18 ms vs 0.9 ms); pass ``backend="torch"`` to prefer it.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch

from sketchattr.project.base import DEFAULT_CACHE_BYTES, Block, ChunkedProjector, _check_int

__all__ = ["SJLTProjector", "sjlt_cuda_available", "load_sjlt_kernel"]

SJLT_CHUNK_COLS = 2**16
SJLT_DEFAULT_BLOCK_SIZE = 2**16  # a whole chunk per step: launch/loop overhead matters (GPU)
KERNEL_THREADS = 1024
KERNEL_BLOCKS = 84
_KERNEL_DTYPES = (torch.float32, torch.float64)
_BACKENDS = ("auto", "torch", "cuda")

_kernel: Callable[..., Any] | None = None
_kernel_tried = False
kernel_error: str | None = None
"""Why the ``sjlt`` kernel could not be loaded (None if it loaded or was not tried)."""


def load_sjlt_kernel() -> Callable[..., Any] | None:
    """``sjlt._C.sjlt_projection_cuda`` or None; imported lazily once, never raises."""
    global _kernel, _kernel_tried, kernel_error
    if not _kernel_tried:
        _kernel_tried = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from sjlt._C import sjlt_projection_cuda  # type: ignore[import-not-found]
            _kernel = sjlt_projection_cuda
        except Exception as exc:  # ImportError, OSError (bad .so), RuntimeError (CUDA ABI) ...
            kernel_error = f"{type(exc).__name__}: {exc}"
    return _kernel


def sjlt_cuda_available() -> bool:
    """True when CUDA is available and the ``sjlt`` kernel imports."""
    return torch.cuda.is_available() and load_sjlt_kernel() is not None


class SJLTProjector(ChunkedProjector, name="sjlt"):
    """Sparse JL sketch with ``c`` nonzeros (``+-1/sqrt(c)``) per input column.

    Args:
        m, seed, cache_bytes: see :class:`~sketchattr.project.base.ChunkedProjector`.
        block_size: max columns per step (default 2**16 = one chunk), further capped at
            ``2**24 // (B * c)``; does not change results.
        c: nonzeros per column (int >= 1), part of :meth:`spec`.
        backend: "auto" (kernel on CUDA when available), "torch" (never the kernel) or
            "cuda" (require the kernel for CUDA inputs; RuntimeError if unavailable).

    Attributes:
        backend_used: "torch" or "sjlt-cuda" for the latest projection (None before any).
    """

    def __init__(
        self,
        m: int,
        seed: int = 0,
        block_size: int = SJLT_DEFAULT_BLOCK_SIZE,
        *,
        c: int = 1,
        backend: str = "auto",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        super().__init__(m, seed=seed, block_size=block_size, cache_bytes=cache_bytes)
        self.c = _check_int("c", c, minimum=1)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.backend = backend
        self.backend_used: str | None = None

    @property
    def chunk_cols(self) -> int:
        return SJLT_CHUNK_COLS

    def step_cols(self, batch_size: int) -> int:
        return self.block_size  # no temporary grows with the step (see the module docstring)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "c": self.c}

    # ------------------------------------------------------------------------ internals
    def _kernel_for(self, dtype: torch.dtype, device: torch.device) -> Callable[..., Any] | None:
        """The CUDA kernel if it should run for this input, else None (torch path)."""
        if self.backend == "torch" or device.type != "cuda":
            return None
        kernel = load_sjlt_kernel() if dtype in _KERNEL_DTYPES else None
        if kernel is None and self.backend == "cuda":
            why = kernel_error or f"dtype {dtype} is not supported by the kernel"
            raise RuntimeError(f"backend='cuda' requested but the sjlt kernel is unusable ({why})")
        return kernel

    def _accumulate(self, out: torch.Tensor, g: torch.Tensor, k: int) -> None:
        self.backend_used = "torch" if self._kernel_for(g.dtype, g.device) is None else "sjlt-cuda"
        super()._accumulate(out, g, k)

    def _draw_chunk(self, gen: torch.Generator, width: int) -> Block:
        idx = torch.randint(0, self.m, (width, self.c), generator=gen)
        signs = (torch.randint(0, 2, (width, self.c), generator=gen) * 2 - 1).to(torch.int8)
        return idx, signs

    def _prepare(self, raw: Block, dtype: torch.dtype, device: torch.device) -> Block:
        """Kernel path: ``(idx, int8 signs)``; torch path: ``(idx + m·[sign < 0],)`` (int64 ``[w, c]``)."""
        idx, signs = (t.to(device) for t in raw)
        if self._kernel_for(dtype, device) is not None:
            return idx, signs
        return (idx + self.m * (signs < 0),)

    def _zeros(self, like: torch.Tensor) -> torch.Tensor:
        width = self.m if self._kernel_for(like.dtype, like.device) is not None else 2 * self.m
        return torch.zeros(like.shape[0], width, dtype=like.dtype, device=like.device)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if out.shape[1] == self.m:  # the kernel accumulated signed, scaled values
            return out
        folded = out[:, : self.m] - out[:, self.m :]
        return folded if self.c == 1 else folded.mul_(1.0 / math.sqrt(self.c))

    def _apply(self, out: torch.Tensor, g: torch.Tensor, block: Block) -> None:
        kernel = self._kernel_for(g.dtype, g.device)
        if kernel is not None:
            idx, signs = block
            out += kernel(g.contiguous(), idx, signs, self.m, self.c, KERNEL_THREADS, KERNEL_BLOCKS)[0]
            return
        (idx2,) = block
        for r in range(self.c):
            out.index_add_(1, idx2[:, r], g)

    def _bytes_per_column(self, dtype: torch.dtype, device: torch.device) -> int:
        sign_bytes = 1 if self._kernel_for(dtype, device) is not None else 0
        return self.c * (8 + sign_bytes)

    def _explicit(self, block: Block, dtype: torch.dtype) -> torch.Tensor:
        if len(block) == 2:
            idx, signs = block
        else:
            idx, signs = block[0] % self.m, 1 - 2 * (block[0] >= self.m).long()
        width = idx.shape[0]
        cols = torch.arange(width).repeat_interleave(self.c)
        vals = signs.reshape(-1).to(dtype) / math.sqrt(self.c)
        dense = torch.zeros(self.m, width, dtype=dtype)
        return dense.index_put_((idx.reshape(-1), cols), vals, accumulate=True)

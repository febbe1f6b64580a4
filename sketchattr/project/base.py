"""Projector base classes, seed derivation, block cache and the ``make_projector`` factory.

A projector is a random linear map ``P`` (``m x d``) that sketches per-example gradients
``g -> P g``.  Gradients arrive as a list of per-module blocks ``grads[k]: [B, d_k]`` and the
projection matrix is split accordingly, ``P = [P_0 | P_1 | ...]``, so that::

    project(grads) = sum_k grads[k] @ P_k.T            # [B, m]

Module ``k`` draws its random numbers from its own streams derived from ``(seed, k)``, so a
shard holding only some modules (or a different total ``d``) agrees on the modules it has.

Random projectors never materialise ``P``.  Module ``k``'s columns are cut into fixed *chunks*
of ``chunk_cols`` columns (a documented function of the spec, e.g. of ``m`` only); chunk ``b``
covers columns ``[b * chunk_cols, min(d_k, (b + 1) * chunk_cols))`` and is drawn from a fresh
``torch.Generator(device="cpu").manual_seed(block_seed(seed, k, b))``.  The exact drawing rule
is documented on each subclass.  ``block_size`` only sets how many columns are processed per
compute step (a step is a slice of at most ``block_size`` columns of one chunk), so it bounds
temporary memory and never changes the sketch (beyond floating-point summation order).
"""
from __future__ import annotations

import abc
import collections
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from sketchattr.core.capture import Capture
from sketchattr.core.checks import check_int as _check_int
from sketchattr.core.registry import Registered

__all__ = [
    "Projector",
    "ChunkedProjector",
    "block_seed",
    "make_projector",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CACHE_BYTES",
]

DEFAULT_BLOCK_SIZE = 8192
DEFAULT_CACHE_BYTES = 256 * 2**20
_SEED_MASK = (1 << 63) - 1
_ALIASES = {"normal": "gaussian", "sparse": "sjlt"}

Block = tuple[torch.Tensor, ...]
"""A random block: tensors whose dim 0 indexes input columns (e.g. ``(P_chunk.T,)``)."""


def block_seed(seed: int, module_index: int, block_index: int) -> int:
    """Seed of chunk ``block_index`` of module ``module_index``.

    Defined as ``int(np.random.SeedSequence([seed, module_index, block_index])
    .generate_state(1, np.uint64)[0]) & (2**63 - 1)`` (masked so that
    ``torch.Generator.manual_seed`` accepts it).  All three arguments must be ints >= 0.
    """
    for name, v in (("seed", seed), ("module_index", module_index), ("block_index", block_index)):
        _check_int(name, v, minimum=0)
    state = np.random.SeedSequence([int(seed), int(module_index), int(block_index)])
    return int(state.generate_state(1, np.uint64)[0]) & _SEED_MASK


def cpu_generator(seed: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(seed)


def _check_dims(dims: Sequence[int]) -> list[int]:
    if isinstance(dims, torch.Tensor) or not isinstance(dims, Sequence) or len(dims) == 0:
        raise ValueError(f"dims must be a non-empty sequence of ints, got {dims!r}")
    return [_check_int(f"dims[{k}]", d, minimum=0) for k, d in enumerate(dims)]


def _check_grads(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Validate a list of per-module gradient blocks ``[B, d_k]``."""
    if isinstance(grads, torch.Tensor):
        raise ValueError(
            "grads must be a list of per-module tensors [B, d_k], got a single tensor; "
            "wrap it in a list: project([g])"
        )
    grads = list(grads)
    if not grads:
        raise ValueError("grads must be a non-empty list of per-module tensors [B, d_k]")
    first = grads[0]
    for k, g in enumerate(grads):
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"grads[{k}] must be a torch.Tensor, got {type(g).__name__}")
        if g.dim() != 2:
            raise ValueError(f"grads[{k}] must be 2-D [B, d_k], got shape {tuple(g.shape)}")
        if not g.is_floating_point():
            raise ValueError(f"grads[{k}] must have a floating dtype, got {g.dtype}")
        if g.shape[0] != first.shape[0]:
            raise ValueError(
                f"all modules must have the same batch size B: grads[0] has B={first.shape[0]}, "
                f"grads[{k}] has B={g.shape[0]}"
            )
        if g.dtype != first.dtype or g.device != first.device:
            raise ValueError(
                f"all modules must share dtype and device: grads[0] is {first.dtype} on "
                f"{first.device}, grads[{k}] is {g.dtype} on {g.device}"
            )
    return grads


class _BlockCache:
    """LRU cache of prepared blocks, bounded by the total bytes of the cached tensors."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: collections.OrderedDict[Any, Block] = collections.OrderedDict()

    @staticmethod
    def _nbytes(block: Block) -> int:
        return sum(t.numel() * t.element_size() for t in block)

    def get(self, key: Any) -> Block | None:
        block = self._items.get(key)
        if block is not None:
            self._items.move_to_end(key)
        return block

    def put(self, key: Any, block: Block) -> None:
        size = self._nbytes(block)
        if size > self.max_bytes or key in self._items:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= self._nbytes(old)
        self._items[key] = block
        self.bytes += size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class Projector(Registered, abc.ABC):
    """Random linear sketch ``g -> P g`` of per-module gradient blocks.

    Args:
        m: sketch dimension (int > 0).
        seed: int >= 0; together with the module index it determines every random number.
        block_size: max input columns per compute step (> 0).  Bounds temporary memory;
            does not change results, hence is not part of :meth:`spec`.
    """

    name: ClassVar[str] = "abstract"
    registry: ClassVar[dict[str, type[Projector]]] = {}
    kind: ClassVar[str] = "projector"

    def __init__(self, m: int, seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE):
        self.m = _check_int("m", m, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0)
        self.block_size = _check_int("block_size", block_size, minimum=1)

    # ----------------------------------------------------------------------- public API
    def output_dim(self, dims: Sequence[int]) -> int:
        """Sketch dimension for modules of sizes ``dims`` (``m`` for random projectors)."""
        _check_dims(dims)
        return self.m

    def workspace_bytes(self, dims: Sequence[int], batch_size: int, dtype: torch.dtype) -> int:
        """Estimated working memory of one batch: its rows ``[batch_size, output_dim]`` (twice, for
        the accumulator and the result). Subclasses add what they hold besides."""
        return 2 * batch_size * self.output_dim(dims) * dtype.itemsize

    def project(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sketch ``sum_k P_k grads[k]``.

        Args:
            grads: per-module blocks, ``grads[k]: [B, d_k]`` for module ``k`` (its list
                position); same B, floating dtype, dtype and device.
        Returns:
            ``[B, m]`` in the input dtype (accumulated in it) on the input device.
        """
        grads = _check_grads(grads)
        out = self._zeros(grads[0])
        for k, g in enumerate(grads):
            self._accumulate(out, g, k)
        return self._finish(out)

    sparse_rows: ClassVar[bool] = False
    """Rows are not coordinates of one linear map (e.g. (value, index) pairs): only scorers that
    read them through :meth:`inner` (the EKFAC family) may use such a store."""

    def project_query(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The query side of :meth:`inner` for preconditioned query gradients (default: :meth:`project`)."""
        return self.project(grads)

    def inner(self, queries: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Inner products ``[n_query, n_rows]`` of :meth:`project_query` rows with stored rows (default:
        ``queries @ rowsᵀ`` in ``dtype``, by default the rows' precision, at least float32)."""
        dtype = dtype or (rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32)
        return queries.to(device=rows.device, dtype=dtype) @ rows.to(dtype).T

    def bind(self, layouts: Sequence[Any]) -> "Projector":
        """Learn the featurizer's block layouts (``KronLayout`` / ``FlatLayout``, one per block);
        projectors that need them (factorized, eigenbasis) override this. Returns ``self``."""
        return self

    def project_captured(self, capture: Capture) -> torch.Tensor:
        """Sketch a batch straight from the hook engine
        (a :class:`~sketchattr.core.capture.Capture`): each block's exact per-example
        gradient arrives in column pieces computed into a reused workspace
        (:meth:`~sketchattr.core.capture.Capture.grad_pieces`), so no ``[B, d]``
        matrix is ever allocated. ``[B, m]``."""
        out = None
        for k, block in enumerate(capture.blocks):
            for start, piece in capture.grad_pieces(k):
                if out is None:
                    out = self._zeros(piece)
                self._accumulate_range(out, piece, k, start, block.dim)
        return self._finish(out)

    def project_module(self, g: torch.Tensor, module_index: int) -> torch.Tensor:
        """Sketch one module's block: ``[B, d_k] -> [B, m]`` (= ``g @ P_k.T``)."""
        (g,) = _check_grads([g])
        k = _check_int("module_index", module_index, minimum=0)
        out = self._zeros(g)
        self._accumulate(out, g, k)
        return self._finish(out)

    def matrix(self, dims: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Explicit ``[m, sum(dims)]`` matrix, built from the same random blocks.

        For tests and small ``d`` only (memory ``m * sum(dims)``).
        """
        dims = _check_dims(dims)
        return torch.cat([self._module_matrix(d, k, dtype) for k, d in enumerate(dims)], dim=1)

    def spec(self) -> dict[str, Any]:
        """JSON-able description that determines the sketch: ``{"type", "m", "seed", ...}``."""
        return {"type": self.name, "m": self.m, "seed": self.seed}

    def __repr__(self) -> str:
        args = {k: v for k, v in self.spec().items() if k != "type"}
        args["block_size"] = self.block_size
        inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
        return f"{type(self).__name__}({inner})"

    # ------------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def _accumulate(self, out: torch.Tensor, g: torch.Tensor, k: int) -> None:
        """In place: ``out += g @ P_k.T`` for a validated ``g: [B, d_k]``."""

    @abc.abstractmethod
    def _module_matrix(self, d: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        """Explicit ``P_k``: ``[m, d]``."""

    def _accumulate_range(self, out: torch.Tensor, g: torch.Tensor, k: int, start: int, d: int) -> None:
        """In place: ``out += g @ P_k[:, start:start + w].T`` for columns ``[start, start + w)`` of a
        module of ``d`` columns (``g: [B, w]``). Default: whole modules only."""
        if start != 0 or g.shape[1] != d:
            raise NotImplementedError(f"{type(self).__name__} projects whole modules only")
        self._accumulate(out, g, k)

    def _zeros(self, like: torch.Tensor) -> torch.Tensor:
        """The accumulator of a projection (``[B, m]``; a subclass may keep a wider one)."""
        return torch.zeros(like.shape[0], self.m, dtype=like.dtype, device=like.device)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """The sketch ``[B, m]`` from the accumulator."""
        return out


class ChunkedProjector(Projector):
    """Random projector whose ``P_k`` is drawn chunk by chunk (see module docstring).

    Subclasses define ``chunk_cols`` and how a chunk is drawn (:meth:`_draw_chunk`), moved
    to the compute dtype/device (:meth:`_prepare`), applied (:meth:`_apply`) and densified
    (:meth:`_explicit`).  Blocks are tuples of tensors whose dim 0 indexes input columns, so
    slicing a chunk into compute steps is generic.

    Args:
        cache_bytes: bound of an LRU cache of prepared chunks keyed by
            ``(module, chunk, width, dtype, device)``; 0 disables it.  Only modules whose
            chunks all fit are cached (a sequential scan of a larger module would only
            thrash), so huge ``d`` costs no cache memory.  Cached chunks are the very tensors
            that would be regenerated: results are identical with or without the cache.
    """

    def __init__(
        self,
        m: int,
        seed: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        super().__init__(m, seed=seed, block_size=block_size)
        self.cache_bytes = _check_int("cache_bytes", cache_bytes, minimum=0)
        self._cache = _BlockCache(self.cache_bytes)

    @property
    @abc.abstractmethod
    def chunk_cols(self) -> int:
        """Columns per random chunk; part of the definition of ``P`` (not of ``block_size``)."""

    @abc.abstractmethod
    def _draw_chunk(self, gen: torch.Generator, width: int) -> Block:
        """Draw one chunk of ``width`` columns on CPU from the freshly seeded ``gen``."""

    @abc.abstractmethod
    def _prepare(self, raw: Block, dtype: torch.dtype, device: torch.device) -> Block:
        """Convert a drawn chunk to what :meth:`_apply` consumes for ``dtype``/``device``."""

    @abc.abstractmethod
    def _apply(self, out: torch.Tensor, g: torch.Tensor, block: Block) -> None:
        """In place: ``out [B, m] += g [B, w] @ P_block.T``."""

    @abc.abstractmethod
    def _explicit(self, block: Block, dtype: torch.dtype) -> torch.Tensor:
        """Dense ``[m, w]`` form of a prepared CPU block."""

    @abc.abstractmethod
    def _bytes_per_column(self, dtype: torch.dtype, device: torch.device) -> int:
        """Bytes of a prepared block per input column (for the cache policy)."""

    def workspace_bytes(self, dims: Sequence[int], batch_size: int, dtype: torch.dtype) -> int:
        """Rows plus one prepared chunk of ``min(chunk_cols, step_cols)`` columns."""
        cols = min(self.chunk_cols, self.step_cols(batch_size), max(_check_dims(dims)))
        return super().workspace_bytes(dims, batch_size, dtype) + cols * self._bytes_per_column(dtype, torch.device("cpu"))

    def step_cols(self, batch_size: int) -> int:
        """Max columns per compute step (default ``block_size``; subclasses may cap it).

        Steps never straddle a chunk, so the effective width is ``<= chunk_cols``.
        """
        return self.block_size

    def clear_cache(self) -> None:
        """Drop all cached chunks."""
        self._cache.clear()

    # ------------------------------------------------------------------------ internals
    def _chunk(
        self, k: int, b: int, width: int, dtype: torch.dtype, device: torch.device, cache: bool
    ) -> Block:
        key = (k, b, width, dtype, str(device))
        block = self._cache.get(key) if cache else None
        if block is None:
            raw = self._draw_chunk(cpu_generator(block_seed(self.seed, k, b)), width)
            block = self._prepare(raw, dtype, device)
            if cache:
                self._cache.put(key, block)
        return block

    def _use_cache(self, d: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Cache a module only if all its chunks fit: an LRU scan larger than it never hits."""
        return 0 < d * self._bytes_per_column(dtype, device) <= self.cache_bytes

    def _iter_blocks(
        self, k: int, d: int, step: int, dtype: torch.dtype, device: torch.device, lo: int = 0, hi: int | None = None
    ) -> Iterator[tuple[int, int, Block]]:
        """Yield ``(start, stop, block)`` covering columns ``[lo, hi)`` (default all ``d``) of module ``k``.

        Pieces never straddle a chunk and have at most ``step`` columns; each chunk is drawn
        (or fetched from the cache) once per call and sliced.
        """
        hi = d if hi is None else hi
        cw, cache = self.chunk_cols, self._use_cache(d, dtype, device)
        for b in range(lo // cw, (hi + cw - 1) // cw):
            c0, c1 = b * cw, min(d, (b + 1) * cw)
            chunk = self._chunk(k, b, c1 - c0, dtype, device, cache)
            for start in range(max(c0, lo), min(c1, hi), step):
                stop = min(c1, hi, start + step)
                yield start, stop, tuple(t[start - c0 : stop - c0] for t in chunk)

    def _accumulate(self, out: torch.Tensor, g: torch.Tensor, k: int) -> None:
        self._accumulate_range(out, g, k, 0, g.shape[1])

    def _accumulate_range(self, out: torch.Tensor, g: torch.Tensor, k: int, start: int, d: int) -> None:
        if g.numel() == 0:
            return
        step = self.step_cols(g.shape[0])
        for lo, hi, block in self._iter_blocks(k, d, step, g.dtype, g.device, start, start + g.shape[1]):
            self._apply(out, g[:, lo - start : hi - start], block)

    def _module_matrix(self, d: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        cpu = torch.device("cpu")
        blocks = self._iter_blocks(k, d, self.chunk_cols, dtype, cpu)
        cols = [self._explicit(block, dtype) for _, _, block in blocks]
        return torch.cat(cols, dim=1) if cols else torch.zeros(self.m, 0, dtype=dtype)


def make_projector(
    kind: str | Projector, m: int | None = None, seed: int = 0, **kwargs: Any
) -> Projector:
    """Build a projector by registry name (or return a :class:`Projector` instance as is).

    Names: ``"identity"``, ``"gaussian"`` (alias ``"normal"``), ``"rademacher"``, ``"sjlt"``
    (alias ``"sparse"``), ``"factorized"`` (``m`` is per module: ``m_out × m_in`` = the near-square
    split of ``m``, or give ``m_out=`` and ``m_in=``), ``"factgrass"`` (mask → Kronecker → SJLT to
    ``m``).  ``kwargs`` go to the constructor (e.g. ``c=``, ``block_size=``).
    """
    if isinstance(kind, Projector):
        return kind
    if not isinstance(kind, str):
        raise ValueError(f"kind must be a projector name or Projector, got {type(kind).__name__}")
    key = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if key not in Projector.registry:
        names = sorted(Projector.registry) + [f"{a} (= {t})" for a, t in sorted(_ALIASES.items())]
        raise ValueError(f"unknown projector {kind!r}; available: {', '.join(names)}")
    cls = Projector.registry[key]
    if key == "factorized":  # sized per module: m_out * m_in
        if m is not None and ("m_out" in kwargs or "m_in" in kwargs):
            raise ValueError("projector 'factorized': give either m (per module, split near-square) or m_out= and m_in=")
        if m is not None:
            kwargs["m_out"], kwargs["m_in"] = square_split(m)
        if "m_out" not in kwargs or "m_in" not in kwargs:
            raise ValueError("projector 'factorized' needs m (per module) or m_out= and m_in=")
        return cls(seed=seed, **kwargs)
    if m is None and key != "identity":
        raise ValueError(f"projector {key!r} needs a sketch dimension m")
    return cls(m, seed=seed, **kwargs)


def square_split(m: int) -> tuple[int, int]:
    """``(m_out, m_in)`` with ``m_out * m_in == m`` and ``m_in`` the largest divisor <= sqrt(m)."""
    m = _check_int("m", m, minimum=1)
    m_in = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    return m // m_in, m_in
